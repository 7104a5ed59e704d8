"""segguided_jax.io.storage on local disk and on a Cloud Storage emulator (tests/gcs_emulator.py):
paths, atomic writes, metrics.jsonl, TensorBoard events, Orbax checkpoints and ArrayRecord reads
in a bucket, the shared-workdir check with two real processes, and staging a data folder."""
import builtins
import contextlib
import gc
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

from segguided_jax.io import runlog, storage
from segguided_jax.parallel import multihost
from segguided_jax.data import staging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def base(request, tmp_path):
    """A fresh folder on either backend."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_dir")


# ---------------------------------------------------------------------------------------------
# Paths and files

def test_local_paths_are_os_path():
    for p in ("runs/x", "/abs/runs/x", "."):
        assert storage.join(p, "checkpoints", "4") == os.path.join(p, "checkpoints", "4")
        assert storage.abspath(p) == os.path.abspath(p)
        assert storage.dirname(p) == os.path.dirname(p)
        assert storage.basename(p) == os.path.basename(p)
        assert not storage.is_remote(p)


def test_uris_stay_uris():
    run = "gs://bucket/runs/brats21"
    assert storage.is_remote(run)
    assert storage.join(run, "checkpoints", "600") == "gs://bucket/runs/brats21/checkpoints/600"
    assert storage.abspath(run) == run
    assert storage.abspath(run + "/") == run and storage.abspath("gs://") == "gs://"
    assert storage.dirname("gs://bucket/runs/brats21/checkpoints/600") == "gs://bucket/runs/brats21/checkpoints"
    assert storage.basename("gs://bucket/runs/brats21/checkpoints/600") == "600"


def test_file_operations(base):
    storage.makedirs(base)
    storage.makedirs(storage.join(base, "sub"))
    storage.write_text(storage.join(base, "config.json"), '{"a": 1}\n')
    storage.write_bytes(storage.join(base, "sub", "x.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(base, "config.json")) == '{"a": 1}\n'
    assert storage.read_bytes(storage.join(base, "sub", "x.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(base, "config.json"))
    assert not storage.exists(storage.join(base, "nothing.json"))
    assert storage.isdir(storage.join(base, "sub")) and not storage.isdir(storage.join(base, "config.json"))
    assert storage.listdir(base) == ["config.json", "sub"]
    storage.write_text(storage.join(base, "config.json"), "replaced")  # overwrite: no temporary left
    assert storage.read_text(storage.join(base, "config.json")) == "replaced"
    assert storage.listdir(base) == ["config.json", "sub"]
    storage.copy_file(storage.join(base, "sub", "x.bin"), storage.join(base, "y.bin"))
    assert storage.read_bytes(storage.join(base, "y.bin")) == b"\x00\x01"
    storage.remove(storage.join(base, "y.bin"))
    assert not storage.exists(storage.join(base, "y.bin"))
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(base, "y.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(base, "nothing.json"))
    with pytest.raises(FileNotFoundError):
        storage.listdir(storage.join(base, "no-such-folder"))
    storage.rmtree(base)
    assert not storage.exists(storage.join(base, "config.json"))


def test_move_a_folder(base):
    """A checkpoint folder set aside: every file arrives, nothing stays behind."""
    src, dst = storage.join(base, "checkpoints", "8"), storage.join(base, "corrupt", "8")
    files = {"_CHECKPOINT_METADATA": b"{}", "state/manifest.ocdbt": b"\x01" * 10, "state/d/abc": b"\x02" * 300}
    for rel, data in files.items():
        storage.makedirs(storage.dirname(storage.join(src, *rel.split("/"))))
        storage.write_bytes(storage.join(src, *rel.split("/")), data)
    storage.write_text(storage.join(base, "checkpoints", "4"), "kept")
    storage.makedirs(storage.join(base, "corrupt"))
    storage.move(src, dst)
    for rel, data in files.items():
        assert storage.read_bytes(storage.join(dst, *rel.split("/"))) == data
    assert storage.isfile(storage.join(dst, "state", "d", "abc")) and not storage.isfile(storage.join(dst, "state"))
    assert not storage.exists(src) and storage.listdir(storage.join(base, "checkpoints")) == ["4"]
    storage.move(storage.join(base, "checkpoints", "4"), storage.join(base, "four"))  # one file
    assert storage.read_text(storage.join(base, "four")) == "kept"
    assert not storage.exists(storage.join(base, "checkpoints", "4"))


def test_failed_local_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "config.json")
    storage.write_text(path, "old")

    with pytest.raises(TypeError):
        storage.write_bytes(path, "not bytes")  # fails inside the write
    assert (tmp_path / "config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_copy_between_backends(tmp_path, gcs_dir):
    data = np.random.default_rng(0).bytes(300_000)
    (tmp_path / "a.bin").write_bytes(data)
    storage.copy_file(str(tmp_path / "a.bin"), storage.join(gcs_dir, "a.bin"), chunk_bytes=65536)
    storage.copy_file(storage.join(gcs_dir, "a.bin"), str(tmp_path / "b.bin"), chunk_bytes=65536)
    assert (tmp_path / "b.bin").read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


class _BreaksHalfWay(io.RawIOBase):
    """A reader of `data` that raises OSError once half of it has been read."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def readinto(self, buf):
        if self.pos >= len(self.data) // 2:
            raise OSError("the source broke half-way")
        n = min(len(buf), len(self.data) // 2 - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


# 300 kB goes up in one request when the file closes; 12 MiB starts a resumable upload whose
# first 5 MiB blocks are sent while the copy runs.
@pytest.mark.parametrize("size", [300_000, 12 << 20])
def test_a_copy_to_a_bucket_that_fails_half_way_leaves_no_object(tmp_path, gcs_dir, monkeypatch, size):
    data = np.random.default_rng(0).bytes(size)
    src, dst = str(tmp_path / "a.bin"), storage.join(gcs_dir, "a.bin")
    (tmp_path / "a.bin").write_bytes(data)

    @contextlib.contextmanager
    def breaking_read(path):
        yield _BreaksHalfWay(data)

    monkeypatch.setattr(storage._LOCAL, "open_read", breaking_read)  # the local source breaks
    with pytest.raises(OSError, match="half-way"):
        storage.copy_file(src, dst, chunk_bytes=1 << 20)
    gc.collect()  # a file object's finaliser that committed the upload would run now
    assert not storage.exists(dst)
    storage.write_bytes(dst, b"old")
    with pytest.raises(OSError, match="half-way"):
        storage.copy_file(src, dst, chunk_bytes=1 << 20)
    gc.collect()
    assert storage.read_bytes(dst) == b"old"  # an existing object keeps its content
    monkeypatch.undo()
    storage.copy_file(src, dst, chunk_bytes=1 << 20)
    assert storage.read_bytes(dst) == data


def test_gs_paths_never_touch_the_local_file_system(gcs_dir, tmp_path, monkeypatch):
    """os.path.abspath (which turns gs://b/x into <cwd>/gs:/b/x), os.makedirs and open never see
    a gs:// path, and no local `gs:` folder appears."""
    monkeypatch.chdir(tmp_path)
    real = {"abspath": os.path.abspath, "makedirs": os.makedirs, "open": builtins.open}

    def guard(name):
        def f(path, *args, **kwargs):
            if str(os.fspath(path)).startswith("gs:"):
                raise AssertionError(f"{name}({path!r})")
            return real[name](path, *args, **kwargs)
        return f

    monkeypatch.setattr(os.path, "abspath", guard("abspath"))
    monkeypatch.setattr(os, "makedirs", guard("makedirs"))
    monkeypatch.setattr(builtins, "open", guard("open"))
    run = storage.abspath(gcs_dir)
    assert run == gcs_dir
    storage.makedirs(storage.join(run, "checkpoints"))
    storage.write_text(storage.join(run, "config.json"), "{}")
    storage.copy_file(storage.join(run, "config.json"), storage.join(run, "copy.json"))
    metrics = runlog.MetricsFile(storage.join(run, "metrics.jsonl"), flush_secs=0)
    metrics.append({"step": 1, "loss": 0.5})
    metrics.truncate_after(1)
    assert metrics.rows() == [{"step": 1, "loss": 0.5}]
    assert storage.listdir(run) == ["config.json", "copy.json", "metrics.jsonl"]
    assert storage.exists(storage.join(run, "config.json")) and storage.isdir(run)
    storage.remove(storage.join(run, "copy.json"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# metrics.jsonl

ROWS = [{"step": 2, "loss": 0.9}, {"step": 4, "loss": 0.7}, {"step": 4, "split": "val", "dice_mean": 0.5},
        {"step": 6, "loss": 0.6}, {"step": 8, "loss": 0.5}, {"step": 8, "split": "val", "dice_mean": 0.6}]


def test_metrics_file_resume_reads_as_one_run(base):
    """A run logs steps 2..8, is killed, resumes from its step-4 checkpoint and logs 6..8 again:
    the file equals the uninterrupted run's."""
    storage.makedirs(base)
    path = storage.join(base, "metrics.jsonl")
    first = runlog.MetricsFile(path, flush_secs=0)
    assert first.rows() == [] and first.truncate_after(0) == 0
    for row in ROWS:
        first.append(row)
    first.flush()
    assert runlog.MetricsFile(path).rows() == ROWS
    resumed = runlog.MetricsFile(path, flush_secs=0)
    assert resumed.truncate_after(4) == 3
    assert runlog.MetricsFile(path).rows() == ROWS[:3]
    for row in ROWS[3:]:
        resumed.append(row)
    resumed.flush()
    assert storage.read_text(path) == "".join(json.dumps(r) + "\n" for r in ROWS)


def test_metrics_file_in_a_bucket_uploads_on_flush(gcs_dir):
    """Object storage: appends are kept until flush_secs pass or flush() is called; rows() sees
    them either way."""
    path = storage.join(gcs_dir, "metrics.jsonl")
    metrics = runlog.MetricsFile(path, flush_secs=3600)
    metrics.append(ROWS[0])
    metrics.append(ROWS[1])
    assert metrics.rows() == ROWS[:2]
    assert not storage.exists(path)
    metrics.flush()
    assert runlog.MetricsFile(path).rows() == ROWS[:2]
    eager = runlog.MetricsFile(path, flush_secs=0)
    eager.append(ROWS[2])  # reads the two rows already there, uploads all three
    assert runlog.MetricsFile(path).rows() == ROWS[:3]


def test_metrics_file_drops_a_torn_last_line(tmp_path, caplog):
    path = str(tmp_path / "metrics.jsonl")
    good = "".join(json.dumps(r) + "\n" for r in ROWS[:3])
    with open(path, "w") as f:
        f.write(good + '{"step": 6, "lo')  # killed in the middle of an append
    metrics = runlog.MetricsFile(path)
    with caplog.at_level(logging.WARNING, logger="segguided_jax.io.runlog"):
        assert metrics.rows() == ROWS[:3]
    assert "dropping its last line" in caplog.text and path in caplog.text
    assert metrics.truncate_after(4) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == good  # the torn line is gone from the file too
    metrics.append(ROWS[3])
    assert metrics.rows() == ROWS[:4]


def test_metrics_file_names_a_corrupt_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\nnot json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        runlog.MetricsFile(path).rows()


# ---------------------------------------------------------------------------------------------
# TensorBoard

def _scalars(data: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TFRecord file of tensorboard Event protos."""
    from tensorboardX.proto import event_pb2

    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_events_in_a_bucket(gcs_dir):
    logdir = storage.join(gcs_dir, "tb")
    writer = runlog.summary_writer(logdir, sync_secs=3600)
    staging = writer.staging
    for step in (1, 2, 3):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.flush()
    assert not storage.exists(logdir)  # within sync_secs of the start: nothing uploaded yet
    writer.close()
    assert not os.path.exists(staging)
    (name,) = storage.listdir(logdir)
    assert name.startswith("events.out.tfevents.")
    assert _scalars(storage.read_bytes(storage.join(logdir, name))) == [
        ("train/loss", 1, 1.0), ("train/loss", 2, 0.5), ("train/loss", 3, pytest.approx(1 / 3))]

    eager = runlog.summary_writer(logdir, sync_secs=0)
    eager.add_scalar("val/dice_mean", 0.25, 4)
    eager.flush()  # uploads at once
    assert len(storage.listdir(logdir)) == 2
    eager.close()
    events = [storage.read_bytes(storage.join(logdir, n)) for n in storage.listdir(logdir)]
    assert sorted(s for e in events for s in _scalars(e))[-1] == ("val/dice_mean", 4, 0.25)


def test_tensorboard_local_is_tensorboardx_itself(tmp_path):
    from tensorboardX import SummaryWriter

    writer = runlog.summary_writer(str(tmp_path / "tb"))
    assert type(writer) is SummaryWriter
    writer.add_scalar("train/loss", 0.5, 1)
    writer.close()
    (name,) = os.listdir(tmp_path / "tb")
    assert _scalars((tmp_path / "tb" / name).read_bytes()) == [("train/loss", 1, 0.5)]


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints in a bucket (tensorstore's gcs driver and gcsfs, both on the emulator)

@pytest.mark.parametrize("async_save", [False, True])
def test_orbax_checkpoints_in_a_bucket(gcs_dir, tmp_path, monkeypatch, async_save):
    """The calls checkpointing.Checkpointer makes: a manager keeping the last 2 of 3 saves of a
    pytree plus JSON items, a best-of manager, and a restore in a fresh manager."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(5, jnp.int32)}
    options = {"enable_async_checkpointing": async_save, "create": True}
    directory = storage.join(gcs_dir, "checkpoints")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, **options)) as mgr:
        for step in (2, 4, 6):
            mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.tree.map(lambda x, k=step: x * k, tree)),
                data=ocp.args.JsonSave({"iterators": [{"pos": step}], "fingerprint": "f00d"}),
                config=ocp.args.JsonSave({"seed": 3})))
        mgr.wait_until_finished()
    best = ocp.CheckpointManager(storage.join(gcs_dir, "best"), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["dice_mean"], best_mode="max", **options))
    for step, dice in ((4, 0.7), (6, 0.6)):
        best.save(step, metrics={"dice_mean": dice}, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.map(lambda x, k=step: x * k, tree))))
    best.wait_until_finished()
    best.close()

    with ocp.CheckpointManager(directory) as mgr:
        assert mgr.all_steps() == [4, 6] and mgr.latest_step() == 6
        r = mgr.restore(6, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.eval_shape(lambda: tree)), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(np.asarray(r["state"]["w"]), np.arange(12.0).reshape(3, 4) * 6)
    np.testing.assert_array_equal(np.asarray(r["state"]["b"]), np.full(5, 6))
    assert r["data"] == {"iterators": [{"pos": 6}], "fingerprint": "f00d"} and r["config"] == {"seed": 3}
    with ocp.CheckpointManager(storage.join(gcs_dir, "best")) as mgr:
        assert mgr.all_steps() == [4]
    assert os.listdir(tmp_path) == []  # no local gs: folder


# ---------------------------------------------------------------------------------------------
# Data: ArrayRecord shards read from a bucket, and staged to local disk

def _upload_dir(local, remote):
    for name in os.listdir(local):
        if os.path.isfile(os.path.join(local, name)):
            storage.copy_file(os.path.join(local, name), storage.join(remote, name))


def test_array_record_reads_shards_from_a_bucket(data_dir, gcs_dir):
    """grain's ArrayRecordDataSource opens gs:// shards itself (google-cloud-cpp inside
    array_record) and returns the same records as from local disk."""
    from grain.sources import ArrayRecordDataSource

    from segguided_jax.data.records import decode_case, load_manifest

    manifest = load_manifest(data_dir)
    _upload_dir(data_dir, gcs_dir)
    local = ArrayRecordDataSource([os.path.join(data_dir, s) for s in manifest["shards"]])
    remote = ArrayRecordDataSource([storage.join(gcs_dir, s) for s in manifest["shards"]])
    assert len(remote) == len(local) == len(manifest["cases"])
    for i in (0, len(local) - 1):
        assert remote[i] == local[i]
    assert decode_case(remote[0])["case_id"] == decode_case(local[0])["case_id"]


def test_stage_data_dir(data_dir, gcs_dir, tmp_path, monkeypatch):
    from segguided_jax.data.records import CaseSource

    _upload_dir(data_dir, gcs_dir)
    target = str(tmp_path / "cache" / "prepared")
    logs = []
    assert staging.stage_data_dir(gcs_dir, target, log_fn=logs.append) == target
    assert len(logs) == 1 and "staged" in logs[0]
    wanted = sorted(n for n in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, n)))
    assert sorted(os.listdir(target)) == wanted
    for name in wanted:
        assert storage.read_bytes(os.path.join(target, name)) == storage.read_bytes(os.path.join(data_dir, name))
    assert os.listdir(tmp_path / "cache") == ["prepared"]  # no partial folder left
    source, staged = CaseSource(data_dir, "val"), CaseSource(target, "val")
    assert [c["id"] for c in staged.cases] == [c["id"] for c in source.cases]
    np.testing.assert_array_equal(staged[0]["image"], source[0]["image"])

    # Same fingerprint: nothing is copied again.
    monkeypatch.setattr(storage, "copy_file", lambda *a, **k: pytest.fail("copied again"))
    assert staging.stage_data_dir(gcs_dir, target, log_fn=logs.append) == target
    assert len(logs) == 1
    monkeypatch.undo()

    # Another fingerprint in the bucket (data converted again): the local copy is replaced.
    manifest = json.loads(storage.read_text(storage.join(gcs_dir, "manifest.json")))
    manifest["fingerprint"] = "0" * 64
    storage.write_text(storage.join(gcs_dir, "manifest.json"), json.dumps(manifest))
    with open(os.path.join(target, "leftover.txt"), "w") as f:
        f.write("from the old copy")
    staging.stage_data_dir(gcs_dir, target, log_fn=logs.append)
    assert len(logs) == 2
    assert json.loads(storage.read_text(os.path.join(target, "manifest.json")))["fingerprint"] == "0" * 64
    assert sorted(os.listdir(target)) == wanted
    assert os.listdir(tmp_path / "cache") == ["prepared"]


def test_stage_data_dir_needs_a_manifest(gcs_dir, tmp_path):
    storage.write_text(storage.join(gcs_dir, "splits.json"), "{}")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        staging.stage_data_dir(gcs_dir, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# The shared-workdir check, with two real processes joined by jax.distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(workdir: str, private_tmpfs: bool) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    procs = []
    for i in range(2):
        cmd = [sys.executable, os.path.join(ROOT, "tests", "shared_workdir_worker.py"), str(port), str(i), workdir]
        if private_tmpfs:  # this process alone sees an empty tmpfs at workdir
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs "$0" && exec "$@"', workdir, *cmd]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=120)  # a hang guard, not a timing
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two processes did not stop")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False).returncode == 0


def test_unshared_workdir_stops_every_process(tmp_path):
    if not _unshare_works():
        pytest.skip("unshare -m is unavailable here (needs root or user namespaces)")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    results = _run_pair(workdir, private_tmpfs=True)
    for r in results:
        assert r.returncode != 0, r.stdout + r.stderr[-3000:]
        assert "WorkdirNotShared" in r.stderr and f"workdir {workdir} is not shared" in r.stderr, r.stderr[-3000:]
        assert "process(es) 1 of 2 cannot see" in r.stderr and "gs://BUCKET" in r.stderr
        assert "shared\n" not in r.stdout
    assert os.listdir(workdir) == []  # the token went to process 0's private tmpfs


def test_shared_local_workdir_passes(tmp_path):
    workdir = str(tmp_path / "run")
    results = _run_pair(workdir, private_tmpfs=False)
    for i, r in enumerate(results):
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"process {i}: shared" in r.stdout
    assert os.listdir(workdir) == []  # the token is removed


def test_shared_bucket_workdir_passes(gcs_dir):
    results = _run_pair(gcs_dir, private_tmpfs=False)
    for i, r in enumerate(results):
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"process {i}: shared" in r.stdout
    assert not storage.exists(gcs_dir)  # the token is removed


def test_one_process_has_nothing_to_check(tmp_path):
    multihost.check_shared_workdir(str(tmp_path / "never-created"))
    assert not os.path.exists(tmp_path / "never-created")
