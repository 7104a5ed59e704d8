"""The training loop: `train_and_evaluate(config, workdir)`; the command is segguided_jax.train.

    python -m segguided_jax.train --config=configs/synthetic.py --workdir=runs/demo [--config.key=value ...]

A run resumes by itself from the newest checkpoint in the workdir, a local folder or a gs:// URI
(every path goes through segguided_jax.io.storage; a multi-process run first checks that all its
processes see the same workdir and stops if they do not). Written there (by process 0):
metrics.jsonl (training rows: step, loss, loss_seg, loss_aux, grad_norm; validation rows: step,
split="val", dice_et, dice_tc, dice_wt, dice_mean and, with gates, attn_dice_ncr, attn_dice_ed,
attn_dice_et), TensorBoard events under tb/, config.json, postprocessing.json (fitted on the
validation cases at the end); and by all processes: checkpoints/ (last K) and best/ (highest
validation dice_mean).

Order at a step that both validates and saves: validate, log the row, update best/, then save the
checkpoint. So a checkpoint implies its step's validation is logged, except after a preemption,
which saves at once; the resumed run then validates that step first. A kill at any moment therefore
gives, after the same command, the metrics.jsonl of an uninterrupted run. In a bucket, where
metrics.jsonl is uploaded whole rather than appended to, it is uploaded after every validation row
and before every checkpoint, so the rows a kill loses are only rows the resumed run drops anyway.
"""
from __future__ import annotations

import functools
import hashlib
import signal
import sys
import time

import jax
import numpy as np

from segguided_jax import config_schema
from segguided_jax.inference import postprocess
from segguided_jax.io import runlog, storage
from segguided_jax.parallel import multihost, sharding
from segguided_jax.training import lease
from segguided_jax.training.watchdog import Watchdog
from segguided_jax.training.checkpointing import CheckpointMismatch, Checkpointer
from segguided_jax.parallel.multihost import all_process_states, preemption_noticed_by_any_process
from segguided_jax.data.brats import SUBREGIONS, labels_to_regions, labels_to_subregions
from segguided_jax.data.pipeline import train_dataset
from segguided_jax.data.records import CaseSource, load_manifest
from segguided_jax.inference.predictor import predict_and_score
from segguided_jax.inference.trained_model import TrainedModel
from segguided_jax.evaluation.metrics import region_dice, soft_dice
from segguided_jax.training.steps import sharded_steps

METRICS = "metrics.jsonl"


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class MetricsLog:
    """metrics.jsonl (runlog.MetricsFile), TensorBoard and the progress line; written by process 0
    only. flush() puts every row logged so far into the workdir (on object storage rows are
    uploaded at most once a minute otherwise)."""

    def __init__(self, workdir: str, resume_step: int):
        self.active = jax.process_index() == 0
        self.file = runlog.MetricsFile(storage.join(workdir, METRICS), warn=_warn)
        # Rows past the checkpoint we resume from were logged by the killed run and will be
        # produced again: drop them so the file reads as one uninterrupted run.
        if self.active:
            self.file.truncate_after(resume_step)
        self.rows = [r for r in self.file.rows() if r["step"] <= resume_step]
        if self.active:
            self.tb = runlog.summary_writer(storage.join(workdir, "tb"))

    def validated(self, step: int) -> dict | None:
        """The validation row of `step`, if logged."""
        return next((r for r in self.rows if r["step"] == step and r.get("split") == "val"), None)

    def last_validation(self) -> dict:
        return next((r for r in reversed(self.rows) if r.get("split") == "val"), {})

    def write(self, row: dict, **tb_only):
        """Appends row to metrics.jsonl; row and tb_only (e.g. timings, which differ between
        otherwise identical runs) go to TensorBoard."""
        self.rows.append(row)
        if not self.active:
            return
        self.file.append(row)
        prefix = "val/" if row.get("split") == "val" else "train/"
        for k, v in {**row, **tb_only}.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(prefix + k, v, row["step"])
        self.tb.flush()

    def flush(self):
        if self.active:
            self.file.flush()

    def progress(self, text: str):
        if self.active:
            print(text, flush=True)

    def close(self):
        if self.active:
            self.file.flush()
            self.tb.close()


class Validator:
    """Validation on the `val` cases of the config's split (never the test cases): the network being
    trained as a TrainedModel, its predictor, post-processing and case loop
    (inference.predictor.predict_and_score) those of predict and the sweep's test evaluation. It
    mirrors as config.eval.mirror_axes says (one pass by default). The post-processing is the
    config's rule without removing components: the component sizes are what the final validation
    fits."""

    def __init__(self, config, graphdef, params, mesh):
        self.source = CaseSource(config.data.dir, "val", config.data.split)
        if config.eval.max_cases:
            self.source.cases = self.source.cases[: config.eval.max_cases]
        self.gates = bool(config.model.gates)
        model = TrainedModel.in_training(config, graphdef, params, config.data.dir)
        settings = model.predictor_settings(mirror_axes=tuple(config.eval.get("mirror_axes", ())))
        self.predictor = model.predictor(settings, mesh)
        self.post = model.postprocessing(learned=None)
        self.candidates = tuple(config.eval.postprocess_candidates_mm3)
        self.choose = functools.partial(postprocess.choose, candidates=self.candidates,
                                        rule=config.eval.postprocess_rule,
                                        floor_mm3=config.eval.postprocess_floor_mm3)

    def __call__(self, params, fit_postprocessing: bool = False, progress=lambda what: None) -> tuple[dict, dict | None]:
        """(validation metrics, the post-processing fitted on these cases if asked, else None);
        progress(what) is called after each case."""
        self.predictor.set_params(params)

        def score(meta, case, out, labels, spacing):
            result = {"dice": region_dice(labels_to_regions(labels), labels_to_regions(case["label"])), "attn": {}}
            if self.gates:
                masks = labels_to_subregions(case["label"])
                result["attn"] = {sub: soft_dice(out[..., 3 + k], masks[..., k]) for k, sub in enumerate(SUBREGIONS)
                                  if masks[..., k].any()}  # fidelity is measured where the sub-region exists
            if fit_postprocessing:
                result["fit"] = postprocess.fit_scores(out, case["label"], spacing, self.post, self.candidates)
            return result

        results = predict_and_score(self.predictor, self.post, self.source, score,
                                    lambda meta, i: progress(f"validation case {meta.get('case_id', i)}"))
        dice_rows = [r["dice"] for r in results]
        attn = {s: [r["attn"][s] for r in results if s in r["attn"]] for s in SUBREGIONS}
        fit = 0.0
        for r in results:  # summed in case order, as the choice was always made
            fit = fit + r.get("fit", 0.0)
        row = {k: float(np.mean([r[k] for r in dice_rows])) for k in dice_rows[0]}
        row["dice_mean"] = float(np.mean(list(row.values())))
        if self.gates:  # a sub-region absent from every case has no fidelity to report
            row.update({f"attn_dice_{s.lower()}": float(np.mean(v)) for s, v in attn.items() if v})
        return row, self.choose(fit, len(self.source)) if fit_postprocessing else None


class NonFiniteGuard:
    """Collects each step's on-device finiteness checks without waiting for them; `check` fetches
    them all at once (before anything is saved or logged) and raises naming the first bad step and,
    when its input was not finite, the case."""

    def __init__(self):
        self.pending = []

    def add(self, step: int, metrics: dict, case_ids) -> None:
        self.pending.append((step, metrics.pop("finite"), metrics.pop("input_finite"), case_ids))

    def check(self, data_dir: str) -> None:
        pending, self.pending = self.pending, []
        flags = jax.device_get([(f, i) for _, f, i, _ in pending])
        for (step, _, _, cases), (finite, inputs) in zip(pending, flags):
            if finite:
                continue
            bad = [str(cases[i]) if cases is not None else f"sample {i} of the batch"
                   for i in np.flatnonzero(~np.asarray(inputs))]
            why = (f"the images of case(s) {', '.join(bad)} hold NaN/Inf: check those cases' input files and "
                   f"re-run the conversion of {data_dir}") if bad else (
                "the inputs were finite: the training diverged (lower optim.learning_rate or "
                "optim.grad_clip_norm)")
            raise FloatingPointError(f"non-finite loss or parameters at step {step}; nothing from this step on is "
                                     f"saved, the last checkpoint is intact. {why}")


class Preemption:
    """Turns SIGTERM into a request to checkpoint and stop. With several processes, JAX's own
    preemption service (started by jax.distributed) catches the signal and agrees on a step."""

    def __init__(self):
        self.requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def noticed(self) -> bool:
        """Whether a SIGTERM has arrived (at any process of the run); safe from another thread."""
        return self.requested if jax.process_count() == 1 else preemption_noticed_by_any_process()

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)


def params_digest(params) -> str:
    """sha256 of this process's copy of the parameters: equal digests, equal parameters."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf.addressable_data(0)).tobytes())
    return h.hexdigest()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _restore_or_init(config, ckpt: Checkpointer, fns, data_iter, fingerprint: str):
    """(state, start step): the newest checkpoint that restores (its data position set on
    data_iter), or a new state."""
    restored = ckpt.restore_newest(fns.abstract, config.to_dict(), warn=_warn)
    if restored is None:
        return fns.init(), 0
    start, state, data_state = restored
    if data_state["fingerprint"] != fingerprint and not config.data.allow_fingerprint_mismatch:
        raise CheckpointMismatch(
            f"{config.data.dir} has data fingerprint {fingerprint[:12]}…, but the checkpoint in {ckpt.directory} was "
            f"trained on {data_state['fingerprint'][:12]}…: other input files or preprocessing. Resume anyway "
            "with --config.data.allow_fingerprint_mismatch=True, or use another --workdir.")
    iterators = data_state["iterators"]
    if len(iterators) != jax.process_count():
        raise ValueError(f"the checkpoint at step {start} was written by {len(iterators)} process(es); this "
                         f"run has {jax.process_count()}, whose data shards differ: resume with as many")
    # Grain's iterator state has another structure with worker processes than without, and one
    # entry per worker: the data position carries over only to as many workers. (Checkpoints
    # written before the count was saved carry none and are not checked.)
    workers = data_state.get("num_workers", config.data.num_workers)
    if workers != config.data.num_workers:
        raise CheckpointMismatch(
            f"the checkpoint at step {start} in {ckpt.directory} holds the data position of a pipeline with "
            f"data.num_workers={workers}; this run has {config.data.num_workers}, whose iterator state differs. "
            f"Resume with --config.data.num_workers={workers} (the batches are the same either way).")
    data_iter.set_state(iterators[jax.process_index()])
    print(f"resumed from {ckpt.directory} at step {start}", flush=True)
    return state, start


def _is_eval_step(step: int, config) -> bool:
    return step % config.train.eval_every == 0 or step == config.train.steps


def train_and_evaluate(config, workdir: str, force_takeover: bool = False) -> dict:
    """Trains (resuming from workdir if it holds a checkpoint) and returns the last validation row.
    workdir: a local path or a gs:// URI (see segguided_jax.io.storage). The run holds the workdir's
    lease (segguided_jax.training.lease) throughout; force_takeover takes it from a run that holds it."""
    derived = config_schema.validate(config)  # before anything is written or read
    storage.set_retry_secs(config.storage.retry_secs)
    storage.makedirs(workdir)
    # First, before anything is written: every process must see one workdir (multi-process runs).
    multihost.check_shared_workdir(workdir)
    # Then, before anything is read: no other run may be using it.
    held = lease.take(workdir, config.lease, force=force_takeover, warn=_warn)
    try:
        return _train(config, derived, workdir, held)
    finally:
        lease.release(held)


def _train(config, derived: config_schema.Derived, workdir: str, held) -> dict:
    """train_and_evaluate's body, run while `held` (process 0's lease; None elsewhere) is held."""
    preemption = Preemption()
    watchdog = Watchdog(config.train.stall_timeout_s, config.train.preempt_grace_s, preemption.noticed,
                        process_index=jax.process_index())
    try:
        return _train_loop(config, derived, workdir, held, preemption, watchdog)
    finally:
        watchdog.close()


def _train_loop(config, derived: config_schema.Derived, workdir: str, held, preemption: Preemption,
                watchdog: Watchdog) -> dict:
    """_train's body, watched by `watchdog` (see segguided_jax.training.watchdog)."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.train.batch_size, config.data.patch, mesh, derived.size_divisor)
    fns = sharded_steps(config, mesh)
    ckpt = Checkpointer(workdir, config.checkpoint)
    data_iter = iter(train_dataset(config.data.dir, config.data, seed=config.seed,
                                   batch_size=config.train.batch_size // jax.process_count(), plan=fns.plan))
    fingerprint = load_manifest(config.data.dir)["fingerprint"]
    state, start = _restore_or_init(config, ckpt, fns, data_iter, fingerprint)
    watchdog.beat("restoring or initialising the state")
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "config.json"), config.to_json(indent=1))
    log = MetricsLog(workdir, start)
    validator = Validator(config, state.graphdef, state.params, mesh)
    guard = NonFiniteGuard()

    def validate(step):
        final = step == config.train.steps
        t0 = time.time()
        metrics, fitted = validator(state.params, fit_postprocessing=final, progress=watchdog.beat)
        row = {"step": step, "split": "val", **metrics}
        log.write(row)
        log.flush()  # the row is in the workdir before best/ and the checkpoint of its step
        ckpt.save_best(step, state, row)
        log.progress(f"validation at step {step} on {len(validator.source)} val cases ({time.time() - t0:.0f}s): "
                     + ", ".join(f"{k.removeprefix('dice_').removeprefix('attn_dice_').upper()}"
                                 f"{' attn' if k.startswith('attn') else ''} {v:.3f}"
                                 for k, v in row.items() if k.startswith(("dice_", "attn_dice_"))))
        if fitted is not None and jax.process_index() == 0:
            path = postprocess.save_learned(workdir, fitted)
            log.progress(f"post-processing fitted on the val cases: minimum component volumes (mm³) "
                         f"{fitted['min_volume_mm3']}; see {path}")
        return row

    def save(step):
        guard.check(config.data.dir)  # nothing non-finite is ever saved
        lease.check(held)  # nor anything over the files of a run that took the workdir over
        # Gathering the iterator states is a collective (all processes call it): only on save steps.
        data_state = {"iterators": all_process_states(data_iter.get_state()), "fingerprint": fingerprint,
                      "num_workers": int(config.data.num_workers)}
        # Every row up to this step is in the workdir before the checkpoint is: a resume from it
        # keeps those rows, and only rows it drops can be lost by a kill.
        log.flush()
        ckpt.save(step, state, data_state, config.to_dict())
        watchdog.beat(f"the checkpoint of step {step}")

    if start and _is_eval_step(start, config) and not log.validated(start):
        validate(start)  # the run stopped (preempted) after saving this step and before validating it
    total = config.train.steps
    watchdog.beat(f"set-up (step {start} of {total})")
    t_last, s_last = time.time(), start
    try:
        for step in range(start + 1, total + 1):
            host = next(data_iter)
            cases = host.pop("case_id", None)
            state, metrics = fns.step(state, sharding.global_batch(host, mesh, fns.batch))
            guard.add(step, metrics, cases)
            if step % config.train.log_every == 0 or step == total:
                guard.check(config.data.dir)
                row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                now = time.time()
                rate = (step - s_last) / (now - t_last)
                t_last, s_last = now, step
                log.write(row, steps_per_sec=rate)
                log.progress(f"step {step}/{total} | loss {row['loss']:.4f} (seg {row['loss_seg']:.4f}, aux "
                             f"{row['loss_aux']:.4f}) | {rate:.2f} steps/s | ETA {_fmt_time((total - step) / rate)}")
            watchdog.beat(f"step {step}")
            if preemption.reached(step):
                save(step)
                log.progress(f"preempted: saved a checkpoint at step {step}; the same command resumes from it")
                break
            if _is_eval_step(step, config):
                guard.check(config.data.dir)
                validate(step)
                t_last = time.time()  # validation time is not training time
            if ckpt.should_save(step) or step == total:
                save(step)
    finally:  # also on an error: finish the saves under way and close the event file
        ckpt.close()
        log.close()
    print(f"process {jax.process_index()}: parameters sha256 {params_digest(state.params)}", flush=True)
    return log.last_validation()

