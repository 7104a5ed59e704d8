"""Training entry point: the same command on every process of a run.

    python -m segguided_jax.train --config=configs/synthetic.py --workdir=runs/demo [--config.key=value ...]

A run resumes by itself from the newest checkpoint in --workdir. Written there (by process 0):
metrics.jsonl (training rows: step, loss, loss_seg, loss_aux, grad_norm; validation rows: step,
split="val", dice_et, dice_tc, dice_wt, dice_mean), TensorBoard events under tb/, config.json;
and by all processes: checkpoints/ (last K) and best/ (highest validation dice_mean).

Several processes (hosts): on a Cloud TPU slice or under SLURM, jax.distributed finds its peers by
itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
SIGTERM (preemption) saves a checkpoint at the next step and exits with status 0.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from segguided_jax import sharding
from segguided_jax.checkpointing import Checkpointer, all_process_states
from segguided_jax.data.brats import labels_to_regions
from segguided_jax.data.pipeline import train_dataset
from segguided_jax.data.records import CaseSource, load_manifest
from segguided_jax.inference import make_window_predictor, probabilities_to_labels, sliding_window
from segguided_jax.metrics import region_dice
from segguided_jax.optim import make_optimizer
from segguided_jax.steps import init_state, train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run, for jax.distributed.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let it detect the "
                                 "cluster (SLURM, Kubernetes, MPI, ...), even where this code would not.")


class MetricsLog:
    """metrics.jsonl, TensorBoard and the progress line; written by process 0 only."""

    def __init__(self, workdir: str, resume_step: int):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.active:
            return
        # Rows past the checkpoint we resume from were logged by the killed run and will be
        # produced again: drop them so the file reads as one uninterrupted run.
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(rows)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, row: dict, **tb_only):
        """Appends row to metrics.jsonl; row and tb_only (e.g. timings, which differ between
        otherwise identical runs) go to TensorBoard."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        prefix = "val/" if row.get("split") == "val" else "train/"
        for k, v in {**row, **tb_only}.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(prefix + k, v, row["step"])
        self.tb.flush()

    def progress(self, text: str):
        if self.active:
            print(text, flush=True)

    def close(self):
        if self.active:
            self.tb.close()


def validate(predict_batch, source: CaseSource, eval_cfg) -> dict:
    """Sliding-window inference on every case of `source`, labelled as predict labels them; mean
    region Dice over cases."""
    rows = []
    for i in range(len(source)):
        case = source[i]
        probs = sliding_window(predict_batch, case["image"], eval_cfg.window, eval_cfg.overlap,
                               eval_cfg.batch_size)
        labels = probabilities_to_labels(probs, eval_cfg.threshold, eval_cfg.min_et_voxels)
        rows.append(region_dice(labels_to_regions(labels), labels_to_regions(case["label"])))
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["dice_mean"] = float(np.mean(list(out.values())))
    return out


def params_digest(params) -> str:
    """sha256 of this process's copy of the parameters: equal digests, equal parameters."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf.addressable_data(0)).tobytes())
    return h.hexdigest()


class Preemption:
    """Turns SIGTERM into a request to checkpoint and stop. With several processes, JAX's own
    preemption service (started by jax.distributed) catches the signal and agrees on a step."""

    def __init__(self):
        self.requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from workdir if it holds a checkpoint) and returns the last validation row."""
    os.makedirs(workdir, exist_ok=True)
    data_dir = config.data.dir
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.train.batch_size, config.data.patch, mesh, 2 ** (len(config.model.widths) - 1))
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    tx = make_optimizer(config.optim, config.train.steps)

    init = jax.jit(functools.partial(init_state, config.seed, config.model, tx), out_shardings=replicated)
    step_fn = jax.jit(functools.partial(train_step, loss_cfg=config.loss, output=config.model.output),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=(replicated, replicated), donate_argnums=0)
    ckpt = Checkpointer(workdir, config.checkpoint)
    dataset = train_dataset(data_dir, config.data, seed=config.seed,
                            batch_size=config.train.batch_size // jax.process_count())
    data_iter = iter(dataset)
    fingerprint = load_manifest(data_dir)["fingerprint"]

    start = ckpt.latest_step()
    if start is None:
        state = init()
        start = 0
    else:
        abstract = jax.eval_shape(init)
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
        state, data_state, _ = ckpt.restore(start, abstract)
        if data_state["fingerprint"] != fingerprint and not config.data.allow_fingerprint_mismatch:
            raise ValueError(
                f"{data_dir} has data fingerprint {fingerprint[:12]}…, but the checkpoint in {ckpt.directory} was "
                f"trained on {data_state['fingerprint'][:12]}…: other input files or preprocessing. Resume anyway "
                "with --config.data.allow_fingerprint_mismatch=True, or use another --workdir.")
        iterators = data_state["iterators"]
        if len(iterators) != jax.process_count():
            raise ValueError(f"the checkpoint at step {start} was written by {len(iterators)} process(es); this "
                             f"run has {jax.process_count()}, whose data shards differ: resume with as many")
        data_iter.set_state(iterators[jax.process_index()])
        print(f"resumed from {ckpt.directory} at step {start}", flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=1))
    log = MetricsLog(workdir, start)

    val_source = CaseSource(data_dir, "val", config.data.split)
    if config.eval.max_cases:
        val_source.cases = val_source.cases[: config.eval.max_cases]
    predict = make_window_predictor(state.graphdef, mesh, output=config.model.output)

    def predict_batch(x):  # every process runs the same windows; the result is replicated
        return predict(state.params, x)

    def save(step, force=False):
        # Gathering the iterator states is a collective (all processes call it): only on save steps.
        if force or ckpt.should_save(step):
            data_state = {"iterators": all_process_states(data_iter.get_state()), "fingerprint": fingerprint}
            ckpt.save(step, state, data_state, config.to_dict())

    preemption = Preemption()
    total, last_val = config.train.steps, {}
    t_last, s_last = time.time(), start
    for step in range(start + 1, total + 1):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = step_fn(state, batch)
        if step % config.train.log_every == 0 or step == total:
            row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss {row['loss']} at step {step}; {row}")
            now = time.time()
            rate = (step - s_last) / (now - t_last)
            t_last, s_last = now, step
            log.write(row, steps_per_sec=rate)
            log.progress(f"step {step}/{total} | loss {row['loss']:.4f} (seg {row['loss_seg']:.4f}, "
                         f"aux {row['loss_aux']:.4f}) | {rate:.2f} steps/s | ETA {_fmt_time((total - step) / rate)}")
        if preemption.reached(step):
            save(step, force=True)
            log.progress(f"preempted: saved a checkpoint at step {step}; the same command resumes from it")
            break
        save(step, force=(step == total))
        if step % config.train.eval_every == 0 or step == total:
            t0 = time.time()
            last_val = {"step": step, "split": "val", **validate(predict_batch, val_source, config.eval)}
            log.write(last_val)
            ckpt.save_best(step, state, last_val)
            log.progress(f"validation at step {step} on {len(val_source)} held-out cases "
                         f"({time.time() - t0:.0f}s): " + ", ".join(
                             f"{k.removeprefix('dice_').upper()} {last_val[k]:.3f}"
                             for k in ("dice_et", "dice_tc", "dice_wt", "dice_mean")))
            t_last = time.time()  # validation time is not training time
    ckpt.close()
    log.close()
    print(f"process {jax.process_index()}: parameters sha256 {params_digest(state.params)}", flush=True)
    return last_val


def initialize_distributed():
    """jax.distributed for multi-process runs: explicit flags, or what the cluster says (JAX itself
    reads SLURM's and Cloud TPU's environment). One process needs nothing."""
    explicit = _COORDINATOR.value is not None
    cluster = (_DISTRIBUTED.value or int(os.environ.get("SLURM_NTASKS", "1")) > 1
               or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
    if not (explicit or cluster):
        return
    # Cross-process collectives between CPU devices need a CPU collectives backend (harmless on
    # accelerators, whose collectives do not use it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save step at INFO (dozens of lines per checkpoint), which buries the
        # progress line; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    if _WORKDIR.value is None:
        sys.exit("--workdir is required")
    initialize_distributed()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
