"""One Orbax CheckpointManager for the train state, the data iterator's position and the config.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed
process leaves the previous checkpoints intact; `latest_step` only ever sees finished ones.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """checkpoints/ keeps the last `keep` checkpoints (state, data state, config); best/ keeps the
    train state with the highest validation dice_mean. Every process calls every method."""

    def __init__(self, workdir: str, ckpt_cfg):
        self.every_steps = ckpt_cfg.every_steps
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=ckpt_cfg.keep,
                enable_async_checkpointing=ckpt_cfg.async_save, create=True))
        self.best = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "best")),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m["dice_mean"], best_mode="max",
                enable_async_checkpointing=ckpt_cfg.async_save, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        """Starts an (asynchronous) save of checkpoint `step`. data_state is JSON-able: the data
        iterators' states and the data fingerprint."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)))

    def save_best(self, step: int, state, val_metrics: dict) -> None:
        """Offers the state to best/, which keeps it only if its dice_mean is the highest yet."""
        self.best.save(step, metrics={"dice_mean": float(val_metrics["dice_mean"])},
                       args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

    def restore(self, step: int, abstract_state):
        """(state, data_state, config) of checkpoint `step`; abstract_state gives shapes, dtypes
        and shardings of the state to build."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return r["state"], r["data"], r["config"]

    def close(self):
        for m in (self.manager, self.best):
            m.wait_until_finished()
            m.close()


def load_for_inference(path: str):
    """(config, graphdef, params) from a training workdir (its newest checkpoint) or from one
    checkpoint folder (WORKDIR/checkpoints/STEP). The config is the one stored in the checkpoint."""
    import functools

    import ml_collections

    from segguided_jax import sharding
    from segguided_jax.optim import make_optimizer
    from segguided_jax.steps import init_state

    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        directory, step = os.path.join(path, "checkpoints"), None
    elif os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    else:
        raise FileNotFoundError(f"{path}: neither a training workdir (with checkpoints/) nor a checkpoint folder")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint")
    config = ml_collections.ConfigDict(manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"])
    tx = make_optimizer(config.optim, config.train.steps)
    # Replicated over this machine's devices, whatever topology wrote the checkpoint.
    replicated = sharding.replicated(sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "spatial": 1})))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(functools.partial(init_state, config.seed, config.model, tx)))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    return config, state.graphdef, state.params


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
