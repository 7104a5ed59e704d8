"""What a user does to a workdir that must not cost the run: resuming it under another model,
optimiser or data (the run stops naming the difference and leaves every file as it was)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from segguided_jax.storage import MetricsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The 8-step run of the fixture: checkpoints 4 and 8, validation at 4 and 8 (one case).
ARGS = ["--config.train.steps=8", "--config.train.log_every=2", "--config.train.eval_every=4",
        "--config.checkpoint.every_steps=4", "--config.eval.max_cases=1"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


def _train(data_dir, workdir, *flags, timeout=600):
    return subprocess.run([sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py",
                           f"--workdir={workdir}", f"--config.data.dir={data_dir}", *ARGS, *flags],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _digests(folder) -> dict:
    """sha256 of every file under folder, by relative path."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished 8-step run made by the training command."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    out = _train(data_dir, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {"4", "8"} <= set(os.listdir(workdir / "checkpoints")) and os.listdir(workdir / "best")
    return workdir


@pytest.fixture()
def other_data(data_dir, tmp_path):
    """A copy of the prepared data whose manifest claims other input files."""
    other = tmp_path / "other_data"
    shutil.copytree(data_dir, other)
    manifest = json.load(open(other / "manifest.json"))
    manifest["fingerprint"] = "0" * 64
    json.dump(manifest, open(other / "manifest.json", "w"))
    return str(other)


CHANGES = {  # change -> (flags, what the message must name)
    "model_width": (["--config.model.widths=(4,8,32)"], "model.widths: stored [4, 8, 16], now [4, 8, 32]"),
    "optimiser": (["--config.optim.weight_decay=0.01"], "optim.weight_decay: stored 0.0001, now 0.01"),
    "data": ([], "has data fingerprint"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_config_stops_and_leaves_the_workdir_untouched(trained, data_dir, other_data, tmp_path, change):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = _digests(workdir)
    flags, named = CHANGES[change]
    out = _train(other_data if change == "data" else data_dir, workdir, *flags)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr[-3000:]
    hint = "allow_fingerprint_mismatch=True" if change == "data" else "allow_config_change=True"
    assert hint in out.stderr and "--workdir" in out.stderr
    assert "step " not in out.stdout  # stopped before training
    assert _digests(workdir) == before  # checkpoints, best/, metrics.jsonl, config.json, tb/ as they were
    assert not (workdir / "corrupt_checkpoints").exists()


def test_a_changed_width_cannot_be_allowed_its_arrays_are_named(trained, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = _digests(workdir)
    out = _train(data_dir, workdir, "--config.model.widths=(4,8,32)", "--config.checkpoint.allow_config_change=True")
    assert out.returncode != 0
    assert "params/down/1/block/conv/kernel/value: stored (2, 2, 2, 8, 16) float32, now (2, 2, 2, 8, 32)" \
        in out.stderr, out.stderr[-3000:]
    assert "cannot be restored into this model" in out.stderr
    assert _digests(workdir) == before


def test_a_changed_optimiser_goes_on_when_allowed(trained, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    kept = MetricsFile(str(workdir / "metrics.jsonl")).rows()
    out = _train(data_dir, workdir, "--config.optim.weight_decay=0.01", "--config.checkpoint.allow_config_change=True",
                 "--config.train.steps=10")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "optim.weight_decay: stored 0.0001, now 0.01" in out.stderr  # still said, as a warning
    assert "resumed from" in out.stdout and "at step 8" in out.stdout
    rows = MetricsFile(str(workdir / "metrics.jsonl")).rows()
    assert rows[:len(kept)] == kept and rows[-1]["step"] == 10
