"""The workdir lease: one run at a time in a workdir.

Two runs on one workdir (a SLURM requeue that starts the job twice, the same command in a second
terminal) would both resume from the same checkpoint and interleave their checkpoints, best/ and
metrics.jsonl. So process 0 of a run holds WORKDIR/lease.json — its host, pid, start time, the
time it was last renewed and a random token — and rewrites it every `config.lease.renew_secs`
from a background thread. A second run finds it and stops at once, naming the holder. A lease not
renewed for `config.lease.stale_secs` (its holder was killed), or held by a process of this host
that no longer exists, is taken over, so kill -9 followed by the same command needs no clean-up;
`force` takes any lease over (the run that held it stops at its next checkpoint).

Every change of the lease is conditional on what the changer last read (storage.write_if and
delete_if), so of two runs racing for a lease only one gets it:
- local (or a shared file system): read, compare and write under an exclusive flock of
  lease.json.lock; the write itself is a temporary file and os.replace;
- gs://: Cloud Storage's generation preconditions — create with if_generation_match=0, renew,
  take over and release with if_generation_match=<the generation read>.
Lease ages compare the holder's clock with the reader's: hosts must keep NTP time, as every
cluster does; `stale_secs` is far larger than any drift.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from segguided_jax.io import storage

LEASE = "lease.json"


class WorkdirLeased(RuntimeError):
    """Another run holds the workdir."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run."""


def read_record(path) -> tuple[dict | None, object]:
    """(the lease record at path, its version), or (None, None) where no run holds one."""
    data, version = storage.read_versioned(path)
    return (None, None) if data is None else (json.loads(data), version)


def write_record(path, record: dict, if_version):
    """Writes the record if the lease is still at if_version (None: no lease); its new version, or
    None if another run changed it since."""
    return storage.write_if(path, json.dumps(record).encode("utf-8"), if_version)


def describe(record: dict, now: float | None = None) -> str:
    """'host H, pid P, started at T, last renewed S s ago' of a lease record."""
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["started"]))
    return (f"host {record['host']}, pid {record['pid']}, started at {started}, last renewed "
            f"{now - record['renewed']:.0f} s ago")


def _holder_is_gone(record: dict, stale_secs: float, now: float) -> str | None:
    """Why the holder of record is no longer running, or None if it may still be."""
    if now - record["renewed"] > stale_secs:
        return f"not renewed for more than {stale_secs:g} s"
    if record["host"] == socket.gethostname():
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return f"process {record['pid']} no longer runs on this host"
        except PermissionError:  # it exists, under another user
            return None
        if _is_zombie(record["pid"]):
            return f"process {record['pid']} no longer runs on this host (it has exited; its parent has not reaped it)"
    return None


def _is_zombie(pid: int) -> bool:
    """Whether pid has exited but is not yet reaped (Linux's /proc state Z). signal 0 still reaches
    such a process: the processes of a run killed with its launcher are orphans, and where nothing
    reaps orphans (PID 1 of many containers) they stay zombies, holding no workdir."""
    if not os.path.isdir("/proc/self"):  # no procfs here (not Linux): signal 0 is all there is
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # after "pid (comm)", comm may hold ")"
    except FileNotFoundError:  # reaped meanwhile
        return True
    except (OSError, IndexError):
        return False
    return state == "Z"


class Lease:
    """The lease of one workdir, taken by `acquire` and held (renewed by a daemon thread) until
    `release`. lease_cfg: stale_secs, renew_secs."""

    def __init__(self, workdir: str, lease_cfg, force: bool = False, warn=None):
        self.path = storage.join(storage.abspath(workdir), LEASE)
        self.stale_secs, self.renew_secs = float(lease_cfg.stale_secs), float(lease_cfg.renew_secs)
        if not 0 < self.renew_secs < self.stale_secs:
            raise ValueError(f"lease.renew_secs ({self.renew_secs:g}) must be positive and below lease.stale_secs "
                             f"({self.stale_secs:g}), or a live run's lease would look abandoned")
        self.force = force
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now,
                       "token": uuid.uuid4().hex}
        self.version = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> None:
        """Takes the lease, or raises WorkdirLeased naming the run that holds it."""
        storage.makedirs(storage.dirname(self.path))
        for _ in range(3):  # each failed try means another run changed the lease: read it again
            held, version = read_record(self.path)
            now = time.time()
            gone = _holder_is_gone(held, self.stale_secs, now) if held else None
            if held and not gone and not self.force:
                raise WorkdirLeased(
                    f"{storage.dirname(self.path)} is in use by another run ({describe(held, now)}). Two runs in "
                    "one workdir would overwrite each other's checkpoints and metrics. Stop that run, or wait: "
                    f"a lease not renewed for {self.stale_secs:g} s (lease.stale_secs) is taken over; if that run "
                    "is certainly gone, add --force_takeover.")
            self.record["renewed"] = time.time()
            self.version = write_record(self.path, self.record, version)
            if self.version is not None:
                if held:
                    self.warn(f"took over the lease of {storage.dirname(self.path)} from {describe(held, now)} "
                              f"({gone or '--force_takeover'})")
                self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
                self._thread.start()
                return
        raise WorkdirLeased(f"{self.path}: other runs keep taking the lease at the same time; run again")

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_secs):
            self.record["renewed"] = time.time()
            try:
                version = write_record(self.path, self.record, self.version)
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next period tries again
                self.warn(f"could not renew the lease {self.path} ({type(e).__name__}: {e}); trying again in "
                          f"{self.renew_secs:g} s")
                continue
            if version is None:
                try:
                    held, _ = read_record(self.path)
                    self.lost = describe(held) if held else "nobody holds it now (it was removed)"
                except Exception as e:  # noqa: BLE001 - lost either way; the holder is only named
                    self.lost = f"the lease could not be read: {type(e).__name__}"
                return
            self.version = version

    def release(self) -> None:
        """Stops renewing and removes the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if not self.lost:
                storage.delete_if(self.path, self.version)


# ---------------------------------------------------------------------------------------------
# Multi-process runs: process 0 holds the lease; every process learns the outcome.

def _from_process_0(message: str | None) -> str | None:
    import jax

    if jax.process_count() == 1:
        return message
    from segguided_jax.parallel.multihost import all_process_states

    return all_process_states({"message": message})[0]["message"]


_HELD: dict[str, list] = {}  # lease path -> [the Lease this process holds, how many takes it answers]


def take(workdir: str, lease_cfg, force: bool = False, warn=None) -> Lease | None:
    """Process 0 acquires the workdir's lease (its Lease returned; None on the other processes);
    every process raises WorkdirLeased if it could not. A collective: every process calls it.
    Reentrant: a process that holds the lease already gets it again, and only the matching last
    `release` gives it up (the train command takes it before its slow imports, so that a second
    run stops within seconds, and train_and_evaluate takes it again)."""
    import jax

    held, message = None, None
    if jax.process_index() == 0:
        path = storage.join(storage.abspath(workdir), LEASE)
        if path in _HELD:
            _HELD[path][1] += 1
            held = _HELD[path][0]
        else:
            held = Lease(workdir, lease_cfg, force=force, warn=warn)
            try:
                held.acquire()
                _HELD[path] = [held, 1]
            except WorkdirLeased as e:
                held, message = None, str(e)
    message = _from_process_0(message)
    if message:
        raise WorkdirLeased(message)
    return held


def check(held: Lease | None) -> None:
    """Raises LeaseLost on every process if process 0's lease was taken over. A collective."""
    message = _from_process_0(held.lost if held is not None else None)
    if message:
        raise LeaseLost(f"the lease of the workdir was taken over by another run ({message}); this run stops "
                        "so as not to overwrite its files")


def release(held: Lease | None) -> None:
    """Gives up one `take` of held (None: nothing to do); the last one releases the lease."""
    if held is None:
        return
    entry = _HELD.get(held.path)
    if entry is not None and entry[0] is held:
        entry[1] -= 1
        if entry[1]:
            return
        del _HELD[held.path]
    held.release()
