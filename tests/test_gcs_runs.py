"""Run directories in a bucket (the Cloud Storage emulator of tests/gcs_emulator.py): training with
--workdir=gs://..., a kill -9 and the same command resuming from the bucket, predict from and to a
bucket, evaluate and the sweep report into one, a damaged checkpoint set aside there; and the
trainer stopping at start-up when its processes do not share the workdir."""
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from segguided_jax.io import runlog, storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Validation on one case keeps the runs short.
OVERRIDES = {"train.steps": 8, "train.log_every": 2, "train.eval_every": 4, "checkpoint.every_steps": 4,
             "eval.max_cases": 1}


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)  # the emulator's variables included
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


def _train_cmd(data_dir, workdir, *flags):
    return [sys.executable, "-m", "segguided_jax.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *flags]


def _rows(workdir):
    return runlog.MetricsFile(storage.join(workdir, "metrics.jsonl")).rows()


def _scalars(data: bytes) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in a TFRecord file of tensorboard Event protos."""
    from tensorboardX.proto import event_pb2

    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        out += [(v.tag, event.step) for v in event.summary.value]
    return out


@pytest.fixture(scope="module")
def whole(gcs_emulator, data_dir, tmp_path_factory):
    """An uninterrupted run trained in this process straight into the bucket, as the sweep names
    its runs: gs://BUCKET/sweep-XXXX/gate_aux-seed0."""
    from configs import tiny
    from segguided_jax.training.loop import train_and_evaluate

    cfg = tiny.get_config()
    cfg.data.dir = data_dir
    for key, value in OVERRIDES.items():
        section, field = key.split(".")
        setattr(cfg[section], field, value)
    workdir = storage.join(gcs_emulator.new_prefix("sweep"), "gate_aux-seed0")
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        train_and_evaluate(cfg, workdir)
        assert os.listdir(".") == []  # no local gs: folder
    finally:
        os.chdir(cwd)
    return workdir


def test_kill9_then_the_same_command_resumes_from_the_bucket(whole, data_dir, gcs_emulator, tmp_path):
    """The documented Cloud TPU setup: data and run in a bucket, the data staged to local disk."""
    run, bucket_data = gcs_emulator.new_prefix("run"), gcs_emulator.new_prefix("data")
    for name in os.listdir(data_dir):
        storage.copy_file(os.path.join(data_dir, name), storage.join(bucket_data, name))
    cwd, staged, tmp = tmp_path / "cwd", str(tmp_path / "staged"), tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = dict(_env(), TMPDIR=str(tmp))  # the killed run's TensorBoard staging folder stays in there
    cmd = _train_cmd(bucket_data, run, f"--stage_data_dir={staged}")
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    # Orbax marks a checkpoint in a bucket complete with commit_success.txt (no rename there).
    done = storage.join(run, "checkpoints", "4", "commit_success.txt")
    deadline = time.time() + 300  # a hang guard, not a timing
    while time.time() < deadline and proc.poll() is None and not storage.exists(done):
        time.sleep(0.02)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished, "the run ended before the kill: " + (tmp_path / "killed.err").read_text()[-3000:]
    expected = _rows(whole)
    # Every row the checkpoint keeps was uploaded before the checkpoint was written.
    assert [r for r in _rows(run) if r["step"] <= 4] == [r for r in expected if r["step"] <= 4]

    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"resumed from {re.escape(run)}/checkpoints at step (4|8)\b", out.stdout), out.stdout
    # The killed run's lease names a process gone from this host: taken over at once.
    assert f"took over the lease of {run} from host {os.uname().nodename}, pid {proc.pid}" in out.stderr
    assert "no longer runs on this host" in out.stderr
    assert not storage.exists(storage.join(run, "lease.json"))  # released at the end
    assert "staged" not in out.stdout  # the first run's copy has the same fingerprint
    assert _rows(run) == expected

    names = storage.listdir(run)
    assert {"checkpoints", "best", "tb", "metrics.jsonl", "config.json", "postprocessing.json"} <= set(names), names
    assert "8" in storage.listdir(storage.join(run, "checkpoints"))
    assert storage.listdir(storage.join(run, "best"))
    config = json.loads(storage.read_text(storage.join(run, "config.json")))
    assert config["train"]["steps"] == 8 and config["data"]["dir"] == staged
    assert sorted(os.listdir(staged)) == sorted(os.listdir(data_dir))
    events = [storage.read_bytes(storage.join(run, "tb", n)) for n in storage.listdir(storage.join(run, "tb"))]
    scalars = {s for e in events for s in _scalars(e)}
    assert ("train/loss", 8) in scalars and ("val/dice_mean", 8) in scalars
    assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(ROOT, "gs:"))  # nothing local


def test_predict_and_evaluate_in_the_bucket(whole, raw_dir, gcs_emulator, tmp_path, monkeypatch, capsys):
    """predict --workdir gs:// --out gs://, with one case failing while its outputs are uploaded
    (none of them stay); evaluate --pred gs:// --out gs:// gives the scores of a local copy."""
    import nibabel as nib

    from segguided_jax.evaluation import evaluate
    from segguided_jax.inference import predict

    monkeypatch.chdir(tmp_path)
    preds, scores = gcs_emulator.new_prefix("preds"), gcs_emulator.new_prefix("scores")
    real = storage.write_bytes

    def write_bytes(path, data):  # the label map, the last file of a case, fails to upload
        if path.endswith("BraTS2021_00001.nii.gz"):
            raise OSError("upload failed")
        real(path, data)

    cases = [os.path.join(raw_dir, f"BraTS2021_{i:05d}") for i in (1, 3)]
    with monkeypatch.context() as m:
        m.setattr(storage, "write_bytes", write_bytes)
        assert predict.main(["--workdir", whole, "--no-tta", "--out", preds, "--input", *cases]) == 1
    assert "upload failed" in capsys.readouterr().err
    assert storage.listdir(preds) == sorted(
        ["BraTS2021_00003.nii.gz", "BraTS2021_00003_panel.png"]
        + [f"BraTS2021_00003_attention_{s}.nii.gz" for s in ("NCR", "ED", "ET")])
    t1 = nib.load(os.path.join(cases[1], "BraTS2021_00003_t1.nii.gz"))
    local_preds = tmp_path / "preds"
    local_preds.mkdir()
    for name in storage.listdir(preds):
        storage.copy_file(storage.join(preds, name), str(local_preds / name))
    labels = nib.load(str(local_preds / "BraTS2021_00003.nii.gz"))
    assert labels.shape == t1.shape
    np.testing.assert_array_equal(labels.affine, t1.affine)

    assert evaluate.main(["--pred", preds, "--ref", raw_dir, "--out", scores]) == 0
    assert {"per_case.csv", "summary.csv", "metrics.json", "boxplot_dice.png"} <= set(storage.listdir(scores))
    remote = json.loads(storage.read_text(storage.join(scores, "metrics.json")))
    local = evaluate.evaluate(str(local_preds), raw_dir, str(tmp_path / "scores"), log=lambda *a, **k: None,
                              warn=lambda msg: None)
    assert remote["num_evaluated"] == local["num_evaluated"] == 1
    assert remote["settings"]["pred"] == preds
    assert remote["summary"] == json.loads((tmp_path / "scores" / "metrics.json").read_text())["summary"]
    per_case = storage.read_text(storage.join(scores, "per_case.csv"))
    assert per_case.replace(preds, str(local_preds)) == (tmp_path / "scores" / "per_case.csv").read_bytes().decode()
    assert storage.read_bytes(storage.join(scores, "boxplot_dice.png")).startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["preds", "scores"]  # no local gs: folder


def test_checkpoint_params_load_from_a_bucket(whole):
    import jax

    from segguided_jax.inference.checkpoint_reader import load_checkpoint_params

    config, _, newest = load_checkpoint_params(whole)[:3]
    _, _, step8 = load_checkpoint_params(storage.join(whole, "checkpoints", "8") + "/")[:3]
    assert config.train.steps == 8
    for a, b in zip(jax.tree.leaves(newest), jax.tree.leaves(step8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sweep_report_into_the_bucket(whole):
    """is_finished and aggregate on a root in a bucket: its per-case CSVs and metrics.jsonl read
    from there, the report written there."""
    from segguided_jax.evaluation.evaluate import write_per_case
    from segguided_jax.experiments.sweep import EVAL_DIR, Run, aggregate, is_finished

    root = storage.dirname(whole)
    run = Run("gate_aux", 0, ())
    assert not is_finished(root, run)
    dice = {"a": (0.5, 0.6, 0.7), "b": (0.7, 0.8, 0.9)}  # ET, TC, WT of two cases
    write_per_case(storage.join(whole, EVAL_DIR, "per_case.csv"), [
        {"case_id": c, "status": "ok", **{f"{k}_{g}": v for g, v in zip(("et", "tc", "wt"), d)
                                          for k in ("dice", "lesion_dice")},
         **{f"hd95_{g}": 2.0 for g in ("et", "tc", "wt")}} for c, d in dice.items()])
    assert is_finished(root, run)
    result = aggregate(root, [run], storage.join(root, "report"))
    summary = result["summary"]["gate_aux"]
    assert summary["runs"] == 1 and summary["dice_et"] == (pytest.approx(0.6), 0.0)
    assert summary["dice_mean"][0] == pytest.approx(0.7)
    assert sorted(storage.listdir(storage.join(root, "report"))) == ["curves.png", "report.md", "runs.csv",
                                                                      "summary.json"]
    assert "| gate_aux | 1 | 0.600 ± 0.000 | 0.700 ± 0.000 | 0.800 ± 0.000 | 0.700 ± 0.000 |" in storage.read_text(
        storage.join(root, "report", "report.md"))
    assert storage.read_bytes(storage.join(root, "report", "curves.png")).startswith(b"\x89PNG")
    assert result["reproducibility"] == [{"setting": "gate_aux", "seed": 0, "runs": [run.name], "identical": None}]


def test_a_second_run_on_a_bucket_workdir_stops_at_once(data_dir, gcs_emulator, tmp_path):
    """The same command started twice on one gs:// workdir: the lease object, created with a
    generation precondition, stops the second naming the first; the first is unaffected."""
    from tests.test_workdir_guards import LONG, REFUSAL_SECS, run_twice

    run = gcs_emulator.new_prefix("twice")
    second, took, pid = run_twice(_train_cmd(data_dir, run, *LONG), run, str(tmp_path), _env())
    assert second.returncode != 0
    assert f"{run} is in use by another run (host {os.uname().nodename}, pid {pid}, started at" in \
        second.stderr, second.stderr[-3000:]
    assert "step " not in second.stdout
    print(f"the second run stopped {took:.1f} s after it started")
    assert took < REFUSAL_SECS  # what it bounds and why 30 s: see tests/test_workdir_guards.py


# Seconds each injected outage lasts in the suite (10 s and 30 s runs by hand are quoted in the
# README). Each fault is met however short it is (tests/fault_proxy.py starts it at the first
# request it matches, which the test asserts), and 3 s already spans several retries of every client;
# longer outages only add waiting (the run took 98 s with 10 s outages against 15 s undisturbed).
OUTAGE_SECS = float(os.environ.get("SEGGUIDED_TEST_OUTAGE_SECS", "3"))


def test_a_run_rides_out_a_failing_bucket(whole, data_dir, gcs_emulator):
    """Workdir and data in the bucket; every storage client of the run (gcsfs, tensorstore under
    Orbax, array_record's reader, google-cloud-storage) talks to the bucket through the fault proxy
    (tests/fault_proxy.py). Outages start in the middle of a checkpoint save (503), of a
    metrics.jsonl upload (429, then reset connections) and of the first shard read (a stall, then
    503): the run ends with the metrics.jsonl and parameters of the undisturbed run."""
    from segguided_jax.inference.checkpoint_reader import load_checkpoint_params
    from segguided_jax.training.loop import params_digest
    from tests.fault_proxy import FaultProxy

    run, bucket_data = gcs_emulator.new_prefix("faults"), gcs_emulator.new_prefix("faultdata")
    for name in os.listdir(data_dir):
        storage.copy_file(os.path.join(data_dir, name), storage.join(bucket_data, name))
    proxy = FaultProxy(gcs_emulator.url)
    try:
        # Each outage starts at a request of the client it is for (the proxy names the client from
        # its User-Agent): Orbax's array writes of checkpoint 4 (tensorstore; matched on the path
        # alone, the outage began at gcsfs's listing of the folder and ended before any write), the
        # metrics.jsonl upload (gcsfs) and the shard reads (array_record).
        proxy.fail("503", OUTAGE_SECS, match=r"^POST .*checkpoints/4/", client="tensorstore")
        proxy.fail("429", OUTAGE_SECS / 2, match=r"^POST .*metrics\.jsonl", client="gcsfs")
        proxy.fail("reset", OUTAGE_SECS, match=r"^POST .*metrics\.jsonl", client="gcsfs")
        proxy.fail("stall", 1, match=r"^GET .*\.array_record\b", stall_secs=5, client="array_record")
        proxy.fail("503", OUTAGE_SECS, match=r"^GET .*\.array_record\b", client="array_record")
        env = dict(_env(), STORAGE_EMULATOR_HOST=proxy.url, TENSORSTORE_GCS_HTTP_URL=proxy.url,
                   CLOUD_STORAGE_EMULATOR_ENDPOINT=proxy.url)
        t0 = time.time()
        out = subprocess.run(_train_cmd(bucket_data, run), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        took = time.time() - t0
    finally:
        proxy.close()
    assert out.returncode == 0, out.stderr[-5000:]
    met = [(kind, sorted({(client, method) for client, method, _ in hits})) for kind, _, hits in proxy.met_by()]
    print(f"faults met (kind, [(client, method)]): {met}; the run took {took:.0f} s")
    # Each fault met the writes or reads it is for (and whatever else came in its window).
    for (kind, clients), wanted in zip(met, [("tensorstore", "POST"), ("gcsfs", "POST"), ("gcsfs", "POST"),
                                             ("array_record", "GET"), ("array_record", "GET")]):
        assert wanted in clients, (kind, wanted, met)
    assert _rows(run) == _rows(whole)
    digests = [params_digest(load_checkpoint_params(storage.join(w, "checkpoints", "8"))[2]) for w in (run, whole)]
    assert digests[0] == digests[1]


def test_slurm_sweep_refuses_a_bucket_root():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_sweep", os.path.join(ROOT, "launch", "sweep.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    with pytest.raises(SystemExit, match=r"--mode=slurm: --root gs://b/sweep is a bucket.*the SLURM nodes share"):
        launcher.main([f"--config={ROOT}/configs/synthetic.py", "--root=gs://b/sweep", "--mode=slurm"])


def _two_checkpoints(gcs_dir):
    """Saves checkpoints 1 and 2 (w = arange(6) · step) in the bucket; returns (config, state)."""
    import jax.numpy as jnp
    import ml_collections

    from segguided_jax.training.checkpointing import Checkpointer

    cfg = ml_collections.ConfigDict({"every_steps": 1, "keep": 3, "async_save": False})
    state = {"w": jnp.arange(6.0)}
    ckpt = Checkpointer(gcs_dir, cfg)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step}, {"iterators": [step]}, {"seed": 0})
    ckpt.close()
    return cfg, state


def test_a_damaged_checkpoint_in_a_bucket_is_set_aside(gcs_dir, tmp_path, monkeypatch):
    import jax

    from segguided_jax.training.checkpointing import CORRUPT_DIR, Checkpointer

    monkeypatch.chdir(tmp_path)
    cfg, state = _two_checkpoints(gcs_dir)
    storage.remove(storage.join(gcs_dir, "checkpoints", "2", "state", "_METADATA"))

    warnings = []
    ckpt = Checkpointer(gcs_dir, cfg)
    step, restored, data_state = ckpt.restore_newest(jax.eval_shape(lambda: state), warn=warnings.append)
    ckpt.close()
    assert step == 1 and data_state == {"iterators": [1]}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0))
    assert len(warnings) == 1 and f"{gcs_dir}/checkpoints/2 cannot be restored" in warnings[0]
    moved = storage.join(gcs_dir, CORRUPT_DIR, "2")
    assert "commit_success.txt" in storage.listdir(moved) and "_CHECKPOINT_METADATA" in storage.listdir(moved)
    assert storage.listdir(storage.join(gcs_dir, "checkpoints")) == ["1"]
    assert os.listdir(tmp_path) == []


def test_setting_aside_in_a_bucket_is_safe_to_repeat(gcs_dir, tmp_path, monkeypatch):
    """A set-aside cut short while deleting the damaged checkpoint (a kill) is finished by the next
    run: the copy in corrupt_checkpoints/ is whole, the source gone, the older checkpoint restores."""
    import jax

    from segguided_jax.training.checkpointing import CORRUPT_DIR, Checkpointer

    monkeypatch.chdir(tmp_path)
    cfg, state = _two_checkpoints(gcs_dir)
    damaged = storage.join(gcs_dir, "checkpoints", "2")
    storage.remove(storage.join(damaged, "state", "_METADATA"))
    fs, key = storage._CLOUD.fs(damaged)
    files = sorted(p.removeprefix(key) for p in fs.find(key))

    rmtree = storage.rmtree

    def killed_half_way(path):  # deletes one object, then the process "dies"
        fs.rm(fs.find(_gcs_key(path))[-1])
        raise KeyboardInterrupt

    def _gcs_key(path):
        return storage._CLOUD.fs(path)[1]

    monkeypatch.setattr(storage, "rmtree", killed_half_way)
    ckpt = Checkpointer(gcs_dir, cfg)
    with pytest.raises(KeyboardInterrupt):
        ckpt.restore_newest(jax.eval_shape(lambda: state), warn=lambda m: None)
    monkeypatch.setattr(storage, "rmtree", rmtree)

    ckpt = Checkpointer(gcs_dir, cfg)
    step, restored, _ = ckpt.restore_newest(jax.eval_shape(lambda: state), warn=lambda m: None)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0))
    moved = storage.join(gcs_dir, CORRUPT_DIR, "2")
    fs, moved_key = storage._CLOUD.fs(moved)
    assert sorted(p.removeprefix(moved_key) for p in fs.find(moved_key)) == files
    assert storage.listdir(storage.join(gcs_dir, "checkpoints")) == ["1"]


def test_trainer_stops_when_its_processes_do_not_share_the_workdir(data_dir, tmp_path):
    """launch/local.sh starts two training processes; each runs in its own mount namespace with a
    private tmpfs at the workdir (a `python` first on PATH wraps it, and gives each process its own
    stderr file), so each sees another folder."""
    from tests.test_storage import _unshare_works

    if not _unshare_works():
        pytest.skip("unshare -m is unavailable here (needs root or user namespaces)")
    workdir = tmp_path / "run"
    workdir.mkdir()
    shim = tmp_path / "bin"
    shim.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    (shim / "python").write_text(
        f"#!/bin/sh\nexec 2>{shlex.quote(str(logs))}/stderr.$$\n"
        "exec unshare -m --propagation private sh -c 'mount -t tmpfs tmpfs \"$0\" && exec \"$@\"' "
        f"{shlex.quote(str(workdir))} {shlex.quote(sys.executable)} \"$@\"\n")
    (shim / "python").chmod(0o755)
    env = dict(_env(), PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(["bash", "launch/local.sh", "2", "--", f"--config={ROOT}/configs/tiny.py",
                          f"--workdir={workdir}", f"--config.data.dir={data_dir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # a hang guard
    errors = [p.read_text() for p in sorted(logs.iterdir())]
    assert out.returncode != 0 and len(errors) == 2, out.stdout + out.stderr[-3000:]
    for err in errors:  # both processes stop with the message
        assert f"WorkdirNotShared: workdir {workdir} is not shared" in err, err[-5000:]
        assert "process(es) 1 of 2 cannot see" in err and "gs://BUCKET" in err
    assert "step " not in out.stdout  # stopped before training
    assert os.listdir(workdir) == []  # each process wrote, if anything, to its own tmpfs


def test_prepared_data_read_straight_from_a_bucket(data_dir, gcs_emulator):
    """data.dir = gs://...: the manifest, the splits and the shards are read from the bucket."""
    from segguided_jax.data.records import CaseSource

    bucket_data = gcs_emulator.new_prefix("direct")
    for name in os.listdir(data_dir):
        storage.copy_file(os.path.join(data_dir, name), storage.join(bucket_data, name))
    local, remote = CaseSource(data_dir, "val"), CaseSource(bucket_data, "val")
    assert [c["id"] for c in remote.cases] == [c["id"] for c in local.cases]
    for i in range(len(local)):
        a, b = local[i], remote[i]
        assert a["case_id"] == b["case_id"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
