"""One Orbax CheckpointManager for the train state, the data iterator's position and the config;
best/ for the best validated state (inference reads parameters with segguided_jax.inference.checkpoint_reader).

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed
process leaves the previous checkpoints intact; `latest_step` only ever sees finished ones, and
temporary folders left by a kill are removed when the next run opens the workdir. A finished
checkpoint that is damaged afterwards (a truncated or garbled file) is set aside by
`restore_newest` and the next older one is used. A whole checkpoint written under another model,
optimiser or data is not damage: `restore_newest` compares the stored config and state tree with
the current ones before restoring and raises CheckpointMismatch naming what differs, leaving the
workdir as it is.

Paths go through segguided_jax.io.storage: the workdir may be local or a gs:// URI (Orbax writes
there itself, each process its own shards).
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from segguided_jax.io import storage

CORRUPT_DIR = "corrupt_checkpoints"
COMMIT_MARKER = "commit_success.txt"  # Orbax marks a checkpoint complete with it where there is no rename
# What a checkpoint's state and data position were made under: a resume under other values of these
# is another experiment. The rest of the config (steps, logging, validation, checkpointing, mesh)
# and the data settings below (where the data is read from, and how fast) may change between runs.
COMPARED = ("seed", "model", "loss", "optim", "data", "train.batch_size")
# How the run is executed, not what it computes: free to change on resume (the GPU convolution
# layout changes the program's layouts, not its math), but for data.num_workers, whose count the
# data position holds (training.loop checks it and names it).
NOT_COMPARED = ("data.dir", "data.allow_fingerprint_mismatch", "data.num_workers", "data.read_threads",
                "data.prefetch", "data.device_crop_dtype", "model.gpu_conv_layout", "model.formulation",
                "model.cpu_rewrites", "model.tpu_fold", "model.tpu_remat_min_voxels")


class CheckpointMismatch(ValueError):
    """A checkpoint that is whole but belongs to another model, optimiser or data than this run's."""


def _flat_config(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """'key: stored X, now Y' for every COMPARED key (less NOT_COMPARED) whose value differs, a key
    present in only one of the two included. Both are plain dicts as saved (JSON: tuples are lists)."""
    def compared(config):
        flat = _flat_config(json.loads(json.dumps(config)))
        return {k: v for k, v in flat.items()
                if any(k == c or k.startswith(c + ".") for c in COMPARED)
                and not any(k == n or k.startswith(n + ".") for n in NOT_COMPARED)}

    old, new = compared(stored), compared(current)
    missing = "(not set)"
    return [f"{k}: stored {old.get(k, missing)!r}, now {new.get(k, missing)!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]


def _leaves_by_path(tree) -> dict:
    def name(key):
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {"/".join(name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(stored, abstract) -> list[str]:
    """'path: stored SHAPE DTYPE, now SHAPE DTYPE' for every array whose shape or dtype differs
    between the stored state's metadata and the abstract state, and every array only one holds."""
    old, new = _leaves_by_path(stored), _leaves_by_path(abstract)

    def describe(leaf):
        return "(absent)" if leaf is None else f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"

    return [f"{path}: stored {describe(old.get(path))}, now {describe(new.get(path))}"
            for path in sorted(old.keys() | new.keys(), key=lambda p: (not p.startswith("params"), p))  # params first
            if describe(old.get(path)) != describe(new.get(path))]


def _manager(directory: str, ckpt_cfg, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=ckpt_cfg.async_save, create=True, cleanup_tmp_directories=True, **options))


class Checkpointer:
    """checkpoints/ keeps the last `keep` checkpoints (state, data state, config); best/ keeps the
    train state with the highest validation dice_mean. Every process calls every method."""

    def __init__(self, workdir: str, ckpt_cfg):
        self.workdir = storage.abspath(workdir)
        self.allow_config_change = bool(ckpt_cfg.get("allow_config_change", False))
        self.every_steps = ckpt_cfg.every_steps
        self.directory = storage.join(self.workdir, "checkpoints")
        self.manager = _manager(self.directory, ckpt_cfg, max_to_keep=ckpt_cfg.keep)
        self.best = _manager(storage.join(self.workdir, "best"), ckpt_cfg, max_to_keep=1,
                             best_fn=lambda m: m["dice_mean"], best_mode="max")

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        """Starts an (asynchronous) save of checkpoint `step`. data_state is JSON-able: the data
        iterators' states and the data fingerprint."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)))

    def save_best(self, step: int, state, val_metrics: dict) -> None:
        """Offers the state to best/, which keeps it only if its dice_mean is the highest yet; waits
        until written, so a checkpoint saved after it implies best/ is up to date. A step already
        there (a run resumed before this step's checkpoint) is kept: training is deterministic."""
        if step in self.best.all_steps():
            return
        self.best.save(step, metrics={"dice_mean": float(val_metrics["dice_mean"])},
                       args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        self.best.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """(state, data_state, config) of checkpoint `step`; abstract_state gives shapes, dtypes
        and shardings of the state to build."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return r["state"], r["data"], r["config"]

    def restore_newest(self, abstract_state, config: dict | None = None, warn=None):
        """(step, state, data_state) of the newest checkpoint that restores, or None if there is
        none. A checkpoint that cannot be read (on any process) is moved to
        WORKDIR/corrupt_checkpoints/STEP with a warning naming it, and the next older one is tried.

        Before restoring, the stored config is compared with `config` (this run's, as a dict; None:
        not compared) and the stored state tree with abstract_state: any difference raises
        CheckpointMismatch naming it, and nothing in the workdir changes. With
        checkpoint.allow_config_change the config differences are only warned about; a state tree
        that differs can never restore."""
        warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        for step in sorted(self.manager.all_steps(), reverse=True):
            error = mismatch = None
            try:
                mismatch = self._mismatch(step, abstract_state, config, warn)
                if mismatch is None:
                    state, data_state, _ = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - damaged files raise anything from JSON to tensorstore errors
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if not _all_processes_agree(mismatch is None):
                raise CheckpointMismatch(mismatch or f"checkpoint {step} does not match this run on another process")
            if _all_processes_agree(error is None):
                return step, state, data_state
            self._set_aside(step, error or "it failed to restore on another process", warn)
        return None

    def _mismatch(self, step: int, abstract_state, config: dict | None, warn) -> str | None:
        """The message of CheckpointMismatch if checkpoint `step` was written for another run, else
        None; raises whatever reading its config or state metadata raises (damage)."""
        where = storage.join(self.directory, str(step))
        fresh = (f"or start this config in a fresh --workdir; {self.workdir} is left as it is (its checkpoints, "
                 "best/ and metrics.jsonl untouched)")
        if config is not None:
            stored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            changed = config_differences(stored, config)
            if changed and not self.allow_config_change:
                return (f"checkpoint {where} was written under another config; what differs:\n  "
                        + "\n  ".join(changed) + "\nIf the change is a mistake, run with the old values; to go on "
                        "from this checkpoint under the new ones on purpose, add "
                        f"--config.checkpoint.allow_config_change=True; {fresh}.")
            if changed:
                warn(f"checkpoint {where} was written under another config; going on with this one "
                     f"(checkpoint.allow_config_change): {'; '.join(changed)}")
        with ocp.PyTreeCheckpointer() as reader:
            stored_tree = reader.metadata(storage.join(where, "state")).item_metadata.tree
        shapes = tree_differences(stored_tree, abstract_state)
        if shapes:
            more = f"\n  … and {len(shapes) - 10} more" if len(shapes) > 10 else ""
            return (f"checkpoint {where} holds a state of other shapes than this run's model and optimiser build "
                    f"({len(shapes)} arrays differ):\n  " + "\n  ".join(shapes[:10]) + more
                    + f"\nIt cannot be restored into this model: run with the config it was written under, {fresh}.")
        return None

    def _set_aside(self, step: int, error: str, warn) -> None:
        target = storage.join(self.workdir, CORRUPT_DIR, str(step))
        warn(f"checkpoint {storage.join(self.directory, str(step))} cannot be restored ({error}); moved to "
             f"{target}, trying the one before it")
        source = storage.join(self.directory, str(step))
        if jax.process_index() == 0 and storage.is_remote(source):
            # A bucket has no rename. Safe to repeat when killed: the server-side copy merges into
            # the target (whole after any complete pass), and the source stops being a checkpoint
            # (its commit marker goes first) before the rest of it is deleted.
            storage.copy_tree(source, target)
            marker = storage.join(source, COMMIT_MARKER)
            if storage.exists(marker):
                storage.remove(marker)
            storage.rmtree(source)
        elif jax.process_index() == 0:
            storage.makedirs(storage.dirname(target))
            if storage.exists(target):
                storage.rmtree(target)
            storage.move(source, target)
        _barrier(f"set_aside_{step}")
        self.manager.reload()

    def close(self):
        for m in (self.manager, self.best):
            m.wait_until_finished()
            m.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))
