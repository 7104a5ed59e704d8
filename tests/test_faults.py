"""What a long run meets: kills at any moment (also inside validation), preemption on a validation
step, damaged checkpoints, non-finite steps, torn log lines, stale temporary folders."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from segguided_jax.data.records import decode_case, encode_case, load_manifest
from segguided_jax.io.runlog import MetricsFile
from segguided_jax.training.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The post-processing rule and floor go through the command too (test_the_command_learns_...), and
# so does the bias-field augmentation, whose draws a resumed run must replay like every other.
ARGS = ["--config.train.steps=8", "--config.train.log_every=2", "--config.train.eval_every=4",
        "--config.checkpoint.every_steps=4", "--config.eval.postprocess_rule=largest",
        "--config.eval.postprocess_floor_mm3=0", "--config.data.augment.bias_field_probability=0.5"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


def _cmd(data_dir, workdir):
    return [sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", *ARGS]


@pytest.fixture(scope="module")
def uninterrupted_workdir(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    out = subprocess.run(_cmd(data_dir, workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_workdir):
    return MetricsFile(str(uninterrupted_workdir / "metrics.jsonl")).rows()


def test_the_command_learns_post_processing_by_the_configured_rule(uninterrupted_workdir):
    """ARGS ask for the largest tied candidate without a floor: postprocessing.json records that
    rule and, per region, the largest candidate whose val lesion-wise Dice ties the best."""
    learned = json.load(open(uninterrupted_workdir / "postprocessing.json"))
    assert (learned["rule"], learned["floor_mm3"], learned["cases"]) == ("largest", 0.0, 2)
    for region, scores in learned["lesion_dice_by_candidate"].items():
        tied = [c for c, s in zip(learned["candidates_mm3"], scores) if np.isclose(s, max(scores))]
        assert learned["min_volume_mm3"][region] == tied[-1], (region, scores)


def _rows_at(workdir):
    return MetricsFile(os.path.join(workdir, "metrics.jsonl")).rows()


# Moments to kill at, as (what to wait for in metrics.jsonl): the training row of an eval step is
# written just before its validation starts; its validation row just before best/ and the checkpoint.
MOMENTS = {"inside_validation": lambda rows: any(r["step"] == 4 and "split" not in r for r in rows),
           "after_validation_row": lambda rows: any(r["step"] == 4 and r.get("split") == "val" for r in rows),
           "inside_final_validation": lambda rows: any(r["step"] == 8 and "split" not in r for r in rows)}


@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_kill9_at_validation_then_rerun_equals_uninterrupted(data_dir, tmp_path, uninterrupted, moment):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data_dir, workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and MOMENTS[moment](_rows_at(workdir)):
            break
        time.sleep(0.005)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished, "the run ended before the kill"
    out = subprocess.run(_cmd(data_dir, workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _rows_at(workdir) == uninterrupted
    assert os.listdir(workdir / "best")  # best/ holds a validated state


def test_preemption_on_a_validation_step_validates_it_on_resume(tiny_config, tmp_path, monkeypatch):
    from segguided_jax.training import loop as train

    cfg = tiny_config
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every_steps = 8, 4, 100
    whole = tmp_path / "whole"
    train_and_evaluate(cfg, str(whole))
    # SIGTERM arrives during step 4, a validation step: the run saves step 4 at once and stops.
    monkeypatch.setattr(train.Preemption, "reached", lambda self, step: step == 4)
    workdir = tmp_path / "run"
    train_and_evaluate(cfg, str(workdir))
    assert not [r for r in _rows_at(workdir) if r.get("split") == "val"]  # it stopped before validating
    monkeypatch.undo()
    train_and_evaluate(cfg, str(workdir))
    assert _rows_at(workdir) == _rows_at(whole)


def _truncate_state_file(ckpt):
    """Truncates the largest array data file of the state (the Adam moments or a big kernel)."""
    files = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(ckpt, "state")) for n in names
             if os.sep + "d" + os.sep in os.path.join(r, n)]
    path = max(files, key=os.path.getsize)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def _garble_data_state(ckpt):
    with open(os.path.join(ckpt, "data", "metadata"), "w") as f:
        f.write('{"iterators": [')


DAMAGE = {"truncated_state": _truncate_state_file, "garbled_data_json": _garble_data_state,
          "no_state_metadata": lambda c: os.remove(os.path.join(c, "state", "_METADATA")),
          "no_ocdbt_manifest": lambda c: os.remove(os.path.join(c, "state", "manifest.ocdbt")),
          "no_config_item": lambda c: shutil.rmtree(os.path.join(c, "config"))}


@pytest.fixture(scope="module")
def stopped_at_8(data_dir, tmp_path_factory):
    """(config, an uninterrupted 12-step run, a copy of that run stopped right after saving step 8)."""
    from configs import tiny
    from segguided_jax.training import loop as train

    cfg = tiny.get_config()
    cfg.data.dir = data_dir
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every_steps = 12, 100, 4
    whole = tmp_path_factory.mktemp("whole12")
    train_and_evaluate(cfg, str(whole))
    stopped = tmp_path_factory.mktemp("stopped8")
    reached = train.Preemption.reached
    train.Preemption.reached = lambda self, step: step == 8  # as if preempted at step 8
    try:
        train_and_evaluate(cfg, str(stopped))
    finally:
        train.Preemption.reached = reached
    return cfg, whole, stopped


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(stopped_at_8, tmp_path, damage, capsys):
    cfg, whole, stopped = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(stopped, workdir)
    DAMAGE[damage](str(workdir / "checkpoints" / "8"))
    train_and_evaluate(cfg, str(workdir))  # resumes from 4 and redoes 5..8
    err = capsys.readouterr().err
    assert f"{workdir / 'checkpoints' / '8'} cannot be restored" in err
    assert (workdir / "corrupt_checkpoints" / "8").exists()
    assert _rows_at(workdir) == _rows_at(whole)


def _nan_shard_copy(data_dir, dest, case_id):
    """A copy of a prepared folder in which one case's image holds a NaN."""
    shutil.copytree(data_dir, dest)
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    manifest = load_manifest(str(dest))
    shard = next(c["shard"] for c in manifest["cases"] if c["id"] == case_id)
    reader = ArrayRecordReader(str(dest / shard))
    records = [reader.read([i])[0] for i in range(reader.num_records())]
    reader.close()
    writer = ArrayRecordWriter(str(dest / shard), "group_size:1")
    for record in records:
        case = decode_case(record)
        if case["case_id"] == case_id:
            case["image"][...] = np.nan
        writer.write(encode_case(case["case_id"], case["image"], case.get("label")))
    writer.close()


def test_nan_in_the_data_names_the_case_and_saves_nothing(tiny_config, data_dir, tmp_path):
    manifest = load_manifest(data_dir)
    splits = json.load(open(os.path.join(data_dir, "splits.json")))
    bad = splits["holdout"]["train"][0]
    dest = tmp_path / "nan_data"
    _nan_shard_copy(data_dir, dest, bad)
    cfg = tiny_config
    cfg.data.dir = str(dest)
    cfg.data.foreground_fraction = 0.0
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.train.log_every = 12, 1, 100
    with pytest.raises(FloatingPointError, match=rf"at step \d+.*case\(s\) [^.]*{bad}"):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    assert manifest["cases"]
    for step in os.listdir(tmp_path / "run" / "checkpoints"):
        if step.isdigit():  # whatever was saved before the bad batch is finite
            from segguided_jax.inference.checkpoint_reader import load_checkpoint_params
            import jax
            _, _, params = load_checkpoint_params(str(tmp_path / "run" / "checkpoints" / step))[:3]
            assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_diverging_run_never_saves_a_non_finite_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config
    # Adam's steps are about the learning rate in size: the second one overflows float32.
    cfg.optim.learning_rate, cfg.optim.grad_clip_norm, cfg.optim.warmup_steps = 1e38, 1e30, 0
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.train.log_every = 20, 1, 100
    with pytest.raises(FloatingPointError, match=r"at step (\d+).*inputs were finite"):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    from segguided_jax.inference.checkpoint_reader import load_checkpoint_params
    import jax
    ckpts = tmp_path / "run" / "checkpoints"
    for step in [d for d in os.listdir(ckpts) if d.isdigit()]:
        _, _, params = load_checkpoint_params(str(ckpts / step))[:3]
        assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params)), step


def test_what_a_kill_leaves_behind_is_cleaned_on_resume(tiny_config, tmp_path, capsys):
    """A torn last metrics.jsonl line is dropped with a warning (damage before the end is an error
    naming the file and line); temporary checkpoint folders of a killed save are removed."""
    cfg = tiny_config
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every_steps = 4, 100, 4
    workdir = tmp_path / "run"
    train_and_evaluate(cfg, str(workdir))
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.7')  # a kill while writing the next row
    stale = [workdir / "best" / "8.orbax-checkpoint-tmp-1234", workdir / "checkpoints" / "8.orbax-checkpoint-tmp-99"]
    for d in stale:
        d.mkdir()
    cfg.train.steps = 6
    train_and_evaluate(cfg, str(workdir))
    assert "metrics.jsonl: dropping its last line, cut short" in capsys.readouterr().err
    assert [r["step"] for r in _rows_at(workdir) if "split" not in r] == [2, 4, 6]
    assert not any(d.exists() for d in stale)
    lines = len(open(workdir / "metrics.jsonl").readlines())
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('garbage\n{"step": 7}\n')  # damage before the end is an error naming the file
    with pytest.raises(ValueError, match=f"metrics.jsonl, line {lines + 1}"):
        MetricsFile(str(workdir / "metrics.jsonl")).rows()
