"""What a user does to a workdir that must not cost the run: resuming it under another model,
optimiser or data (the run stops naming the difference and leaves every file as it was), and
starting a second run in it (the workdir lease stops it; a dead holder's lease is taken over)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

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

    from segguided_jax import lease, storage

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
    backend = lease.Lease(lease_dir, _lease_cfg()).backend
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    for record, why in [({"host": socket.gethostname(), "pid": int(dead.stdout)}, "no longer runs on this host"),
                        ({"host": "elsewhere", "pid": 1, "renewed": now - 61}, "not renewed for more than 60 s")]:
        record = {"started": now - 100, "renewed": now, "token": "old", **record}
        version = backend.write(record, backend.read()[1])
        assert version is not None
        warnings = []
        taker = lease.Lease(lease_dir, _lease_cfg(), warn=warnings.append)
        taker.acquire()
        assert len(warnings) == 1 and why in warnings[0] and f"pid {record['pid']}" in warnings[0]
        taker.release()
    backend.write({"host": "elsewhere", "pid": 1, "started": now, "renewed": now, "token": "live"}, None)
    with pytest.raises(lease.WorkdirLeased, match="host elsewhere, pid 1"):
        lease.Lease(lease_dir, _lease_cfg()).acquire()


def test_a_second_run_on_the_same_workdir_stops_at_once(trained, data_dir, tmp_path):
    """The same command started twice: the second stops naming the first, the first is unaffected."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.dir={data_dir}", *ARGS]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # a hang guard
        while not (workdir / "lease.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        # Python lists every module it imports on stderr: the second run must stop before the
        # training stack is even imported.
        second = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), PYTHONPROFILEIMPORTTIME="1"), capture_output=True,
                                text=True, timeout=300)
        took = time.time() - t0
        assert first.poll() is None, "the first run ended before the second started"
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode != 0
    assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid}, started at" in second.stderr, \
        second.stderr[-3000:]
    assert "step " not in second.stdout
    imported = [line.split("|")[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")]
    assert "jax" in imported and "segguided_jax.lease" in imported  # the profile was taken
    assert not [m for m in imported if m.split(".")[0] in ("orbax", "grain", "flax", "optax")]
    # Python, JAX and the config take about 3 s on an idle 2-core machine; the bound leaves room
    # for a loaded one (and the first run is compiling meanwhile).
    print(f"the second run stopped {took:.1f} s after it started")
    assert took < 30
    assert first.returncode == 0, err[-3000:]
    assert MetricsFile(str(workdir / "metrics.jsonl")).rows() == MetricsFile(str(trained / "metrics.jsonl")).rows()
    assert not (workdir / "lease.json").exists()  # released at the end
