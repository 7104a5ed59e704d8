"""The training command: flags, the config's check, jax.distributed and the workdir lease, then
training.loop.train_and_evaluate(config, workdir).

    python -m segguided_jax.train --config=configs/synthetic.py --workdir=runs/demo [--config.key=value ...]

The config is checked (segguided_jax.config_schema) and the workdir's lease taken before the
training stack (JAX's programs, Orbax, Grain) is imported, so a config that cannot work or a second
run in a workdir stops within seconds. The workdir may be a local folder or a
gs:// URI; --stage_data_dir=LOCAL copies a data.dir in a bucket to local disk first (once per data
fingerprint) and trains from the copy. Several processes (hosts): on a Cloud TPU
slice or under SLURM, jax.distributed finds its peers by itself; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. A process that dies is noticed by
the others within --heartbeat_timeout seconds, after which they stop with an error; the same command
then resumes the run from its last checkpoint.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from segguided_jax.parallel.multihost import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, logs.")
_STAGE = flags.DEFINE_string("stage_data_dir", None, "Copy config.data.dir (e.g. gs://BUCKET/prepared) to this local "
                             "folder first, unless it already holds a copy with the same manifest fingerprint, and "
                             "train from the copy: every sample reads a whole case, so local reads keep the input "
                             "pipeline fed. Each host makes its own copy.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run, for jax.distributed.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let it detect the "
                                 "cluster (SLURM, Kubernetes, MPI, ...), even where this code would not.")
_FORCE_TAKEOVER = flags.DEFINE_bool("force_takeover", False, "Take the workdir's lease from the run that holds it, "
                                    "even if it was renewed recently (that run stops at its next checkpoint). Only "
                                    "when that run is certainly gone: a lease not renewed for config.lease.stale_secs "
                                    "is taken over without this.")
# JAX's default (100 s) left a run hanging for well over a minute after a peer was killed; 30 s
# notices a dead host quickly while riding out a busy one (heartbeats come from their own thread).
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds without a heartbeat after which the other "
                                  "processes declare a process dead and stop (multi-process runs).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save step at INFO (dozens of lines per checkpoint), which buries the
        # progress line; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    if _WORKDIR.value is None:
        sys.exit("--workdir is required")
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value,
                           _HEARTBEAT.value)
    from segguided_jax import config_schema
    from segguided_jax.training import lease

    config = _CONFIG.value
    # First: a config that cannot work stops here, naming the keys, before the workdir is touched.
    try:
        config_schema.validate(config)
    except config_schema.ConfigError as e:
        sys.exit(f"error: {e}")
    # Before the slow imports and the data staging: a second run in this workdir stops within seconds.
    try:
        held = lease.take(_WORKDIR.value, config.lease, force=_FORCE_TAKEOVER.value)
    except lease.WorkdirLeased as e:
        sys.exit(f"error: {e}")
    try:
        from segguided_jax.training.checkpointing import CheckpointMismatch
        from segguided_jax.training.loop import train_and_evaluate

        if _STAGE.value:
            from segguided_jax.data import staging

            config.data.dir = staging.stage_data_dir(config.data.dir, _STAGE.value)
        try:
            train_and_evaluate(config, _WORKDIR.value)
        except CheckpointMismatch as e:  # the user's to decide, not a crash: the message says how
            sys.exit(f"error: {e}")
    finally:
        lease.release(held)


def run():
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
