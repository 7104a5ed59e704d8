"""A trained network's parameters read from a training run's checkpoint (the optimiser state left on
disk), local or gs://. Orbax and flax are imported only when a checkpoint is read."""
from __future__ import annotations

import jax

from segguided_jax.io import storage


def _checkpoint_folder(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step or None for the newest) for a workdir or one checkpoint folder."""
    path = storage.abspath(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        return storage.join(path, "checkpoints"), None
    if storage.basename(path).isdigit():
        return storage.dirname(path), int(storage.basename(path))
    raise FileNotFoundError(f"{path}: neither a training workdir (with checkpoints/) nor a checkpoint folder")


def load_checkpoint_params(path: str, config=None):
    """(config, graphdef, params, step) from a training workdir (its newest checkpoint) or from one
    checkpoint folder (WORKDIR/checkpoints/STEP), local or gs://: only the parameters are read (no
    optimiser state), placed on the default device. The config is the one stored in the checkpoint,
    or `config` for checkpoints that hold none (WORKDIR/best/STEP)."""
    import ml_collections
    import orbax.checkpoint as ocp
    from flax import nnx

    from segguided_jax.models.network import abstract_model

    directory, step = _checkpoint_folder(path)
    if step is None:
        steps = ocp.path.step.checkpoint_steps(directory)
        if not steps:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        step = max(steps)
    step_dir = storage.join(directory, str(step))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # A Checkpointer with a handler for every item a checkpoint may hold, rather than a read-only
    # CheckpointManager: Orbax warns on every read-only manager and on every item it has no handler
    # for, none of which a user can act on.
    handler = ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
                                             data=ocp.JsonCheckpointHandler(), metrics=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(handler) as reader:
        if config is None:
            config = ml_collections.ConfigDict(
                reader.restore(step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
        # The saved state is {step, params, opt_state}; read the params subtree alone, its leaves in
        # the layout nnx.State writes (each variable a {"value": array} node).
        on_disk = reader.metadata(step_dir).item_metadata["state"].tree["params"]
        target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), on_disk)}
        restored = reader.restore(step_dir, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target),
            partial_restore=True)))["state"]["params"]
    graphdef, abstract = nnx.split(abstract_model(config.model), nnx.Param)
    pure = jax.tree.map(lambda node: node["value"], restored,
                        is_leaf=lambda x: isinstance(x, dict) and set(x) == {"value"})
    nnx.replace_by_pure_dict(abstract, pure)
    return config, graphdef, abstract, step
