"""Multi-device and multi-process behaviour on CPU: fake devices and local processes."""
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from segguided_jax.optim import make_optimizer
from segguided_jax.steps import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt4"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_checks.py"), ckpt],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), ckpt


def test_spatially_sharded_forward_equals_unsharded(four_devices):
    results, _ = four_devices
    assert results["spatial_forward_shards"] == 4
    assert results["spatial_forward_max_abs_diff"] < 1e-4


def test_spatially_sharded_train_step_agrees_in_loss_gradients_and_parameters(four_devices):
    r = four_devices[0]["spatial_step"]
    ref, sharded = r["one"]["losses"], r["spatial"]["losses"]
    assert np.isfinite(sharded).all() and sharded == pytest.approx(ref, rel=1e-5)
    assert r["grads_max_abs_diff"] < 1e-5 * r["grads_max_abs"]
    # 3 steps moved the parameters by up to param_change; the two runs stay 100x closer than that
    assert r["params_max_abs_diff"] < 1e-2 * r["param_change_max_abs"]


def test_spatially_sharded_step_keeps_activations_split(four_devices):
    """The memory claim: on (data 2, spatial 2) no value of the compiled step holds a whole patch
    depth at full resolution (every one holds its device's half), and the per-device temporaries
    fall well below the data split's alone (1/2 of one device's)."""
    r = four_devices[0]["spatial_step"]
    assert r["one"]["whole_depth_values"] > 0 and r["one"]["half_depth_values"] == 0
    assert r["spatial"]["whole_depth_values"] == 0 and r["spatial"]["half_depth_values"] > 0
    assert r["spatial"]["temp_bytes"] < 0.35 * r["one"]["temp_bytes"]


def test_augment_on_device_step_on_a_spatial_mesh_equals_one_device(four_devices):
    r = four_devices[0]["augment_on_device_step"]
    assert np.isfinite(r["spatial"]).all() and r["spatial"] == pytest.approx(r["one"], rel=1e-5)


def test_windows_over_four_devices_equal_one(four_devices):
    assert four_devices[0]["windows_1_vs_4_max_abs_diff"] < 1e-5


def test_four_device_checkpoint_restores_on_one(four_devices):
    results, ckpt = four_devices
    assert jax.device_count() == 1
    cfg = tiny.get_config()
    init = functools.partial(init_state, 0, cfg.model, make_optimizer(cfg.optim, 10))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), jax.eval_shape(init))
    with ocp.CheckpointManager(ckpt) as mgr:
        restored = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    fresh = jax.jit(init)()
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(sum(np.sum(np.asarray(p)) for p in jax.tree.leaves(restored.params))) == pytest.approx(
        results["param_sum"], rel=1e-6)


def _two_process_cmd(data_dir, workdir, steps):
    return ["bash", "launch/local.sh", "2", "--devices", "2", "--",
            "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.dir={data_dir}",
            f"--config.train.steps={steps}", "--config.train.batch_size=4", "--config.train.log_every=1",
            "--config.checkpoint.every_steps=2", "--config.train.eval_every=4"]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _digests(stdout):
    # Both processes write to one pipe and their lines may interleave: match the lines' contents.
    found = dict(re.findall(r"process (\d+): parameters sha256 ([0-9a-f]{64})", stdout))
    return [found[k] for k in sorted(found)]


def test_two_processes_kill_resume_equals_uninterrupted(data_dir, tmp_path):
    steps = 8
    whole = subprocess.run(_two_process_cmd(data_dir, tmp_path / "whole", steps), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    digests = _digests(whole.stdout)
    assert len(digests) == 2 and digests[0] == digests[1]  # both processes hold the same parameters

    # Interrupted the hard way: process 1 frozen (SIGSTOP) mid-run, so process 0 is stuck in a
    # collective that never completes; a SIGTERM to process 0 asks for a checkpoint at a step it
    # cannot reach, so after train.preempt_grace_s its watchdog ends it (exit 75, a message); then
    # kill -9 of every process of the run.
    workdir = tmp_path / "killed"
    grace = 3
    proc = subprocess.Popen(_two_process_cmd(data_dir, workdir, steps) + [f"--config.train.preempt_grace_s={grace}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(d.isdigit() and int(d) >= 2 for d in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    finished_early = proc.poll() is not None
    try:
        if not finished_early:
            first, peer = _pid(0, workdir), _pid(1, workdir)
            os.kill(peer, signal.SIGSTOP)
            os.kill(first, signal.SIGTERM)
            stopped = _wait_for_exit(first, limit=120)
    finally:
        _kill_run(proc)
    assert not finished_early, "the run ended before it could be interrupted"
    err = proc.stderr.read()
    assert stopped < grace + 15, f"process 0 ran on for {stopped:.0f} s after SIGTERM:\n{err[-3000:]}"
    assert "process 0: preemption notice (SIGTERM)" in err and "the last checkpoint is intact" in err, err[-3000:]
    done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
    assert done, "no checkpoint within 300 s"
    again = subprocess.run(_two_process_cmd(data_dir, workdir, steps), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {max(done)}" in again.stdout
    assert _rows(workdir) == _rows(tmp_path / "whole")  # identical, row for row, after the restart
    assert _digests(again.stdout) == digests


def test_sigterm_saves_at_next_step_and_exits_zero(data_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.dir={data_dir}", "--config.train.steps=100000", "--config.checkpoint.every_steps=1000",
           "--config.train.eval_every=1000000", "--config.train.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "preempted: saved a checkpoint at step" in rest
    saved = int(rest.split("preempted: saved a checkpoint at step ")[1].split(";")[0])
    assert saved >= 3 and (workdir / "checkpoints" / str(saved)).exists()


def test_a_dead_peer_stops_the_run_within_the_heartbeat_timeout(data_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = _two_process_cmd(data_dir, workdir, 100000)
    cmd.insert(cmd.index("--") + 1, "--heartbeat_timeout=10")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (workdir / "metrics.jsonl").exists() and len(_rows(workdir)) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended early"
        ps = subprocess.run(["pgrep", "-f", "--", f"--process_id=1 .*--workdir={workdir}"], capture_output=True, text=True)
        victim = int(ps.stdout.split()[0])
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
        noticed = time.time() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert noticed < 45, f"process 0 went on for {noticed:.0f} s after its peer died"


def test_a_run_with_a_frozen_peer_stops_within_the_stall_bound(data_dir, tmp_path):
    """Process 1 frozen (SIGSTOP) mid-run: process 0 waits in a collective that never completes, and
    the frozen peer's heartbeats stop too, but the heartbeat bound is set out of reach, so only the
    watchdog can end it, after train.stall_timeout_s without progress. (30 s: three times the
    tiny run's slowest gap between two pieces of progress, the first train step's compilation,
    when the two processes share 2 cores.)"""
    workdir, stall = tmp_path / "run", 30
    cmd = _two_process_cmd(data_dir, workdir, 100000)
    cmd[cmd.index("--") + 1:cmd.index("--") + 1] = ["--heartbeat_timeout=900"]
    # No validation and no checkpoints: the only slow gap left is the train step's compilation.
    cmd += [f"--config.train.stall_timeout_s={stall}", "--config.train.preempt_grace_s=0",
            "--config.train.eval_every=1000000", "--config.checkpoint.every_steps=1000000"]
    log = tmp_path / "stdout"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.PIPE,
                                start_new_session=True, text=True)
    try:
        deadline = time.time() + 300  # metrics.jsonl is written at checkpoints only: watch the progress line
        while time.time() < deadline and proc.poll() is None and "\nstep 2/" not in log.read_text():
            time.sleep(0.1)
        first, peer = _pid(0, workdir), _pid(1, workdir)
        running = first is not None and peer is not None and "\nstep 2/" in log.read_text()
        if running:
            os.kill(peer, signal.SIGSTOP)
            stopped = _wait_for_exit(first, limit=stall + 90)
    finally:
        _kill_run(proc)
    err = proc.stderr.read()
    assert running, f"the run stopped before its second step:\n{err[-3000:]}"
    assert stopped < stall + 15, f"process 0 ran on for {stopped:.0f} s:\n{err[-3000:]}"
    assert "process 0: no progress for" in err and "the last checkpoint is intact" in err, err[-3000:]


def _kill_run(proc):
    """kill -9 of every process of a run started in its own session (a frozen peer, the launcher)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # all gone already
        pass
    proc.wait()


def _pid(index, workdir):
    """The pid of training process `index` of the run in workdir."""
    out = subprocess.run(["pgrep", "-f", "--", f"--process_id={index} .*--workdir={workdir}"],
                         capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.stdout.split() else None


def _wait_for_exit(pid, limit):
    """Seconds until process `pid` (a grandchild: the launcher reaps it) has exited, at most limit."""
    start = time.time()
    while time.time() - start < limit:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    return time.time() - start


LIBTPU = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")  # where launch/env.sh installs it


@pytest.mark.skipif(not os.path.exists(LIBTPU), reason="no libtpu: launch/env.sh installs it on x86-64 Linux only")
def test_spatial_groups_stay_on_one_process_on_multi_host_tpu_slices():
    """On slices of several 4-chip hosts (v5e:2x4, v5e:4x4, v5p:4x4x4 = 64 chips on 16 hosts),
    every spatial group sits on one process, each process feeds as many rows as the others, and the
    physical layout is kept wherever it already did so. Spatial 4 is the case the physical layout
    gets wrong: it spans hosts there, and make_mesh lays each host out on its own instead."""
    import fcntl

    # libtpu serves one process at a time: TPU compiles on one machine queue here instead of failing.
    with open("/tmp/segguided-libtpu.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tpu_mesh_checks.py"), LIBTPU],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        if name.endswith("error"):
            continue
        assert r["each_device_once"] and r["groups_across_processes"] == 0, name
        assert len(r["rows_per_process"]) == 1, name  # every process feeds as many rows
        assert r["kept_physical_layout"] == (r["physical_groups_across_processes"] == 0), name
    assert results["v5p:4x4x4 spatial=4"]["devices"] == 64 and results["v5p:4x4x4 spatial=4"]["processes"] == 16
    assert results["v5p:4x4x4 spatial=4"]["physical_groups_across_processes"] > 0  # the case that needs the fix
    assert results["v5e:4x4 spatial=4"]["physical_groups_across_processes"] > 0
    assert "mesh.spatial=8 must divide the 4 devices of each of the 16 processes" in results["v5p:4x4x4 spatial=8 error"]
