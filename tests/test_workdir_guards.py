"""What a user does to a workdir that must not cost the run: resuming it under another model,
optimiser or data (the run stops naming the difference and leaves every file as it was), and
starting a second run in it (the workdir lease stops it; a dead holder's lease is taken over)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from segguided_jax.io.runlog import MetricsFile

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
    """sha256 of every file under folder, by relative path (but the lease's lock file, which a run
    leaves, empty, once it has taken the lease)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name == "lease.json.lock":
                continue
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


def test_a_resume_with_other_grain_workers_stops_naming_the_count(trained, data_dir, tmp_path):
    """data.num_workers says how, not what (the batches are the same), but Grain's iterator state
    differs with worker processes: a resume with another count stops before training, naming the
    checkpoint's count, and leaves the workdir as it was."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = _digests(workdir)
    out = _train(data_dir, workdir, "--config.data.num_workers=1")
    assert out.returncode != 0
    assert "data.num_workers=0; this run has 1" in out.stderr, out.stderr[-3000:]
    assert "--config.data.num_workers=0" in out.stderr
    assert "step " not in out.stdout
    assert _digests(workdir) == before


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


# ---------------------------------------------------------------------------------------------
# The workdir lease

@pytest.fixture(params=["local", "bucket"])
def lease_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_emulator").new_prefix("lease")


def _lease_cfg(stale_secs=60.0):
    import ml_collections

    return ml_collections.ConfigDict({"renew_secs": 0.05, "stale_secs": stale_secs})


def test_lease_stops_a_second_run_and_is_taken_over_from_a_dead_or_silent_holder(lease_dir):
    import socket

    from segguided_jax.io import storage
    from segguided_jax.training import lease

    storage.makedirs(lease_dir)
    first = lease.Lease(lease_dir, _lease_cfg())
    first.acquire()
    with pytest.raises(lease.WorkdirLeased, match=rf"in use by another run \(host {socket.gethostname()}, "
                                                  rf"pid {os.getpid()}, started at .*--force_takeover"):
        lease.Lease(lease_dir, _lease_cfg()).acquire()
    forced = lease.Lease(lease_dir, _lease_cfg(), force=True, warn=lambda m: None)
    forced.acquire()
    deadline = time.time() + 30  # a hang guard: the first holder notices at its next renewal (50 ms)
    while first.lost is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(lease.LeaseLost, match="taken over by another run"):
        lease.check(first)
    first.release()  # releases nothing: the lease is the forced run's
    with pytest.raises(lease.WorkdirLeased):
        lease.Lease(lease_dir, _lease_cfg()).acquire()
    forced.release()
    assert not storage.exists(storage.join(lease_dir, lease.LEASE))

    # Leases their holders left behind: a dead process of this host, another host's stale one.
    path = lease.Lease(lease_dir, _lease_cfg()).path
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # An exited process that nobody has reaped yet (signal 0 still reaches it): a run's processes
    # killed with their launcher, where PID 1 does not reap orphans.
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 30
    while time.time() < deadline and open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    os.kill(zombie.pid, 0)  # still there for signal 0
    now = time.time()
    for record, why in [({"host": socket.gethostname(), "pid": int(dead.stdout)}, "no longer runs on this host"),
                        ({"host": socket.gethostname(), "pid": zombie.pid}, "it has exited"),
                        ({"host": "elsewhere", "pid": 1, "renewed": now - 61}, "not renewed for more than 60 s")]:
        record = {"started": now - 100, "renewed": now, "token": "old", **record}
        version = lease.write_record(path, record, lease.read_record(path)[1])
        assert version is not None
        warnings = []
        taker = lease.Lease(lease_dir, _lease_cfg(), warn=warnings.append)
        taker.acquire()
        assert len(warnings) == 1 and why in warnings[0] and f"pid {record['pid']}" in warnings[0]
        taker.release()
    zombie.wait()
    lease.write_record(path, {"host": "elsewhere", "pid": 1, "started": now, "renewed": now, "token": "live"}, None)
    with pytest.raises(lease.WorkdirLeased, match="host elsewhere, pid 1"):
        lease.Lease(lease_dir, _lease_cfg()).acquire()


# The first run of "the same command twice": 100000 steps, so that it is certainly still running
# when the second is refused; the test then stops it as a scheduler preempts a job (SIGTERM) once it
# has trained a step, so it runs only as long as the test needs it.
LONG_STEPS = 100000
LONG = [f"--config.train.steps={LONG_STEPS}", "--config.train.log_every=1", f"--config.train.eval_every={LONG_STEPS}",
        f"--config.checkpoint.every_steps={LONG_STEPS}"]
# The bound on a refusal, from the second run's start to its exit. A refusal is Python, JAX and the
# config: about 3 s on an idle 2-core machine, 11-14 s measured on one loaded 2.5 times over with
# the first run compiling beside it. A refusal that waited would take 30 s more than that: for the
# holder's next renewal (lease.renew_secs, 30 s), through gcsfs's retries of one request (about 31
# s), for the lease to go stale (lease.stale_secs, 180 s). (That it stops before the training stack
# is imported is checked apart, from its import profile.)
REFUSAL_SECS = 30


def _wait_for(ready, what, first, secs=300):
    """Polls ready() until it is true; fails if the run `first` ended or secs (a hang guard) passed."""
    deadline = time.time() + secs
    while not ready():
        assert first.poll() is None, f"the first run ended (exit {first.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {secs} s"
        time.sleep(0.05)


def run_twice(cmd, workdir, logs, env, second_env=None):
    """Starts the training command cmd (with LONG) on workdir (local or gs://) and, once the first
    run holds the workdir's lease, the same command again. Checks that the first run is unaffected:
    still running after the second returned, its lease as it was, it then trains, and a SIGTERM
    makes it save a checkpoint and exit 0 after writing the metrics of every step, the lease
    released (a release deletes the lease only if it is the version this run wrote). Returns the
    second run's CompletedProcess, the seconds it took and the first run's pid. logs: a local
    folder for the first run's output."""
    from segguided_jax.io import runlog, storage
    from segguided_jax.training import lease

    path = lease.Lease(workdir, _lease_cfg()).path
    out_path, err_path = os.path.join(logs, "first.out"), os.path.join(logs, "first.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        _wait_for(lambda: lease.read_record(path)[0] is not None, "its lease was taken", first)
        held = lease.read_record(path)[0]
        t0 = time.time()
        second = subprocess.run(cmd, cwd=ROOT, env=second_env or env, capture_output=True, text=True, timeout=300)
        took = time.time() - t0
        assert first.poll() is None, f"the first run ended (exit {first.returncode}) during the second"
        now = lease.read_record(path)[0]
        assert (now["pid"], now["token"]) == (first.pid, held["token"]), now
        # A progress line comes after a step: the SIGTERM handler is set by then.
        _wait_for(lambda: f"step 1/{LONG_STEPS} " in open(out_path).read(), "training step", first)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stdout, stderr = open(out_path).read(), open(err_path).read()
    assert first.returncode == 0, stderr[-3000:]
    assert "preempted: saved a checkpoint at step " in stdout, stdout[-3000:]
    saved = int(stdout.split("preempted: saved a checkpoint at step ")[1].split(";")[0])
    assert storage.isdir(storage.join(workdir, "checkpoints", str(saved)))
    rows = runlog.MetricsFile(storage.join(workdir, "metrics.jsonl")).rows()
    assert [r["step"] for r in rows] == list(range(1, saved + 1))
    assert not storage.exists(storage.join(workdir, lease.LEASE))
    return second, took, first.pid


def test_a_second_run_on_the_same_workdir_stops_at_once(data_dir, tmp_path):
    """The same command started twice: the second stops naming the first, the first is unaffected."""
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.dir={data_dir}", *LONG]
    # Python lists every module it imports on stderr: the second run must stop before the
    # training stack is even imported.
    second, took, pid = run_twice(cmd, workdir, str(tmp_path), _env(), dict(_env(), PYTHONPROFILEIMPORTTIME="1"))
    assert second.returncode != 0
    assert f"is in use by another run (host {os.uname().nodename}, pid {pid}, started at" in second.stderr, \
        second.stderr[-3000:]
    assert "step " not in second.stdout
    imported = [line.split("|")[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")]
    assert "jax" in imported and "segguided_jax.training.lease" in imported  # the profile was taken
    assert not [m for m in imported if m.split(".")[0] in ("orbax", "grain", "flax", "optax")]
    print(f"the second run stopped {took:.1f} s after it started")
    assert took < REFUSAL_SECS
