"""What the processes of a multi-process run (several hosts, or launch/local.sh) do together:
join jax.distributed, check that they see one workdir, exchange small JSON states, and learn of a
preemption notice sent to any of them. With one process each is free (nothing to do)."""
from __future__ import annotations

import contextlib
import json
import os
import uuid

import jax
import numpy as np

from segguided_jax.io import storage


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                           detect: bool, heartbeat_timeout: int) -> None:
    """jax.distributed for multi-process runs: explicit coordinates, or what the cluster says (JAX
    itself reads SLURM's and Cloud TPU's environment). One process needs nothing."""
    cluster = (detect or int(os.environ.get("SLURM_NTASKS", "1")) > 1
               or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
    if coordinator is None and not cluster:
        return
    # Cross-process collectives between CPU devices need a CPU collectives backend (harmless on
    # accelerators, whose collectives do not use it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout)
    if jax.devices()[0].platform == "cpu":
        # No persistent compilation cache for multi-process CPU runs. On CPU the cache key covers
        # the device topology, which holds the process index, so each process has keys of its own;
        # only process 0 writes entries (jax/_src/compiler.py: "Not writing persistent cache entry
        # since process_id != 0"; jax-ml/jax#18819 asks for other writers). So on a filled cache
        # process 0 loads its executables and the others compile theirs, every time: nothing is
        # gained, and with jax 0.12.1 the loaded and the freshly compiled train step never meet in
        # their first all-reduce (launch/local.sh 2 --devices 2 hung at step 1 on 3 launches of 3
        # on a filled cache). On GPU the key leaves the device assignment out for exactly this
        # (jax/_src/cache_key.py) and a TPU slice has one topology for all its hosts, so there
        # every process hits or misses together and the cache stays on.
        jax.config.update("jax_enable_compilation_cache", False)


class WorkdirNotShared(RuntimeError):
    """The processes of a run do not see the same workdir."""


def check_shared_workdir(workdir) -> None:
    """Stops a multi-process run at once if its processes do not all see the same workdir.

    Process 0 writes a token file with a random value into workdir; after a barrier every other
    process reads it; the outcome is gathered so that every process raises WorkdirNotShared
    (with the same message) or none does. A collective: every process must call it. Nothing to
    check with one process.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    workdir = os.fspath(workdir)
    nonce = np.frombuffer(uuid.uuid4().bytes, np.int32).copy()  # 4 int32: no 64-bit types needed
    nonce = np.asarray(multihost_utils.broadcast_one_to_all(nonce))
    value = "".join(f"{int(x) & 0xFFFFFFFF:08x}" for x in nonce)
    token = storage.join(workdir, f".shared-workdir-check-{value[:12]}")
    if jax.process_index() == 0:
        storage.makedirs(workdir)
        storage.write_text(token, value)
    multihost_utils.sync_global_devices("segguided_jax.parallel.multihost.check_shared_workdir: token written")
    if jax.process_index() == 0:
        seen = True
    else:
        try:
            seen = storage.read_text(token) == value
        except FileNotFoundError:
            seen = False
    seen_by = np.asarray(multihost_utils.process_allgather(np.array([seen], np.int32))).reshape(-1)
    if jax.process_index() == 0:
        with contextlib.suppress(FileNotFoundError):
            storage.remove(token)
    blind = [i for i, s in enumerate(seen_by) if not s]
    if blind:
        raise WorkdirNotShared(
            f"workdir {workdir} is not shared between the processes of this run: process(es) "
            f"{', '.join(map(str, blind))} of {len(seen_by)} cannot see the file "
            f"{storage.basename(token)} that process 0 wrote there. All processes write the checkpoints "
            f"and resume from them, so they must all see one workdir: use a bucket "
            f"(--workdir=gs://BUCKET/runs/NAME) or a folder on a file system every host mounts "
            f"at the same path (NFS, a gcsfuse mount of the bucket).")


def all_process_states(state: dict) -> list[dict]:
    """Every process's JSON-able `state` (e.g. its data iterator's), in process order; a
    collective: every process must call it."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(n, np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(jax.process_count(), n)
    return [json.loads(bytes(r).rstrip(b"\0")) for r in rows]


def preemption_noticed_by_any_process() -> bool:
    """Whether jax.distributed's preemption service has recorded a SIGTERM to any process of the run.

    That service (started by jax.distributed.initialize) catches SIGTERM in C++ and writes
    RECEIVED_PREEMPTION_NOTICE into the coordination service's key-value store, where every
    process can read it without a collective."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        return False
    try:
        client.key_value_try_get("RECEIVED_PREEMPTION_NOTICE")
    except Exception:  # NOT_FOUND until a notice arrives; an unreachable coordinator is the heartbeat's job
        return False
    return True
