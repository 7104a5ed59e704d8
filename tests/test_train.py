import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from segguided_jax.data.pipeline import train_dataset
from segguided_jax.training.optim import learning_rate_schedule, make_optimizer, sgdr_cycles
from segguided_jax.training.steps import init_state, train_step
from segguided_jax.training.loop import train_and_evaluate



def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("gates, aux_weight", [(True, 0.1), (False, 0.0), (True, 0.0)])
def test_loss_falls_on_a_fixed_batch(tiny_config, gates, aux_weight):
    cfg = tiny_config
    cfg.model.gates, cfg.loss.aux_weight = gates, aux_weight
    cfg.data.foreground_fraction = 1.0
    cfg.optim.learning_rate = 1e-2
    batch = next(iter(train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2)))
    batch.pop("case_id")  # host-side only: names the cases of a bad batch
    tx = make_optimizer(cfg.optim, 40)
    state = jax.jit(functools.partial(init_state, 0, cfg.model, tx))()
    step = jax.jit(functools.partial(train_step, loss_cfg=cfg.loss, output=cfg.model.output))
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert int(state.step) == 40
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3])
    if gates and aux_weight > 0:
        assert float(m["loss_aux"]) > 0
    else:
        assert float(m["loss_aux"]) == 0.0


def test_sgdr_restarts():
    assert sgdr_cycles(100, 20, 2.0, 2) == [20, 40, 80]
    cfg = type("O", (), dict(learning_rate=1.0, sgdr_first_cycle_steps=10, sgdr_cycle_mult=1.0,
                             warmup_steps=0, min_lr_ratio=0.0))
    lr = learning_rate_schedule(cfg, 30)
    assert float(lr(0)) == pytest.approx(1.0)
    assert float(lr(9)) < 0.05 and float(lr(10)) == pytest.approx(1.0)  # warm restart


def test_train_writes_contract_files_and_resumes(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = tiny_config
    cfg.train.steps = 4
    first = train_and_evaluate(cfg, workdir)
    assert first["step"] == 4 and set(first) >= {"dice_et", "dice_tc", "dice_wt", "dice_mean", "split"}
    cfg.train.steps = 8
    last = train_and_evaluate(cfg, workdir)
    assert last["step"] == 8
    rows = _rows(workdir)
    assert [r["step"] for r in rows if "split" not in r] == [2, 4, 6, 8]  # continued, not restarted
    val = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in val] == [4, 8]
    for r in val:
        assert 0.0 <= r["dice_mean"] <= 1.0
        assert r["dice_mean"] == pytest.approx(np.mean([r["dice_et"], r["dice_tc"], r["dice_wt"]]))
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 8
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [4, 8]
    assert os.listdir(os.path.join(workdir, "tb"))

    # The checkpoint remembers its data's fingerprint: other data is refused unless allowed.
    other = tmp_path / "other_data"
    shutil.copytree(cfg.data.dir, other)
    manifest = json.load(open(other / "manifest.json"))
    manifest["fingerprint"] = "0" * 64
    json.dump(manifest, open(other / "manifest.json", "w"))
    cfg.data.dir = str(other)
    with pytest.raises(ValueError, match="fingerprint"):
        train_and_evaluate(cfg, workdir)
    cfg.data.allow_fingerprint_mismatch = True
    cfg.train.steps = 10
    assert train_and_evaluate(cfg, workdir)["step"] == 10


def test_no_test_case_is_read_by_training_or_validation(tiny_config, tmp_path, monkeypatch):
    """Every record read while training and validating (best/ included) belongs to the train or
    val part; the held-out test cases are never touched."""
    from grain.sources import ArrayRecordDataSource

    from segguided_jax.data.records import load_manifest

    read = []
    getitem, getitems = ArrayRecordDataSource.__getitem__, ArrayRecordDataSource.__getitems__
    monkeypatch.setattr(ArrayRecordDataSource, "__getitem__", lambda self, i: (read.append(i), getitem(self, i))[1])
    monkeypatch.setattr(ArrayRecordDataSource, "__getitems__",
                        lambda self, keys: (read.extend(keys), getitems(self, keys))[1])
    cfg = tiny_config
    cfg.train.steps, cfg.train.eval_every = 8, 4
    train_and_evaluate(cfg, str(tmp_path / "run"))
    splits = json.load(open(os.path.join(cfg.data.dir, "splits.json")))["holdout"]
    record = {c["id"]: c["record"] for c in load_manifest(cfg.data.dir)["cases"]}
    test_records = {record[c] for c in splits["test"]}
    assert test_records and read
    assert not test_records & set(read), "a test case was read"
    assert {record[c] for c in splits["val"]} <= set(read)  # validation did read its own cases
    assert os.listdir(tmp_path / "run" / "best")
