"""Runs of several local processes (launch/local.sh, gloo collectives on CPU) and of one: a kill -9
and the same command resuming, SIGTERM, a dead peer and a frozen one."""
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


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
    watchdog can end it, after train.stall_timeout_s without progress. (60 s: six times the tiny
    run's slowest gap between two pieces of progress, the first train step's compilation, when its
    two processes have 2 cores to themselves; the suite runs beside other test processes. The wait
    is idle, so the test's length costs the suite little.)"""
    workdir, stall = tmp_path / "run", 60
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
