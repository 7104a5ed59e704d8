"""One Orbax CheckpointManager for the train state, the data iterator's position and the config.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed
process leaves the previous checkpoints intact; `latest_step` only ever sees finished ones.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, ckpt_cfg):
        self.every_steps = ckpt_cfg.every_steps
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=ckpt_cfg.keep,
                enable_async_checkpointing=ckpt_cfg.async_save, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
        """Saves if `step` is a multiple of checkpoint.every_steps (or force). Returns whether a
        save started. data_state is JSON-able: the data iterator's state and the data fingerprint."""
        if not force and step % self.every_steps:
            return False
        return self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)))

    def restore(self, step: int, abstract_state):
        """(state, data_state, config) of checkpoint `step`; abstract_state gives shapes, dtypes
        and shardings of the state to build."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return r["state"], r["data"], r["config"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
