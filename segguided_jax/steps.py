"""The train state, the pure step function, and their one jitted, sharded form."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from segguided_jax import sharding
from segguided_jax.losses import total_loss
from segguided_jax.models.network import build_model
from segguided_jax.optim import make_optimizer

# Non-partitionable threefry, set here where the parameters are drawn so that every entry point
# draws the same numbers: with jax 0.12's partitionable default the CPU compiler took ~140 s
# (instead of ~8 s) to compile the synthetic config's parameter init.
jax.config.update("jax_threefry_partitionable", False)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the network's nnx.Param variables, float32
    opt_state: optax.OptState
    graphdef: Any = struct.field(pytree_node=False)  # the network's structure, static
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def init_state(seed: int, model_cfg, tx: optax.GradientTransformation) -> TrainState:
    """A new train state. Jit it (with out_shardings) so parameters are created on device."""
    graphdef, params = nnx.split(build_model(model_cfg, nnx.Rngs(seed)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      graphdef=graphdef, tx=tx)


def train_step(state: TrainState, batch: dict, *, loss_cfg, output: str):
    """One optimizer step on batch {"image": (N, D, H, W, 4) float32, "label": (N, D, H, W) uint8}.

    Returns (new state, metrics): scalars "loss", "loss_seg", "loss_aux", "grad_norm", and two
    checks computed on the devices so the host need not look at every step: "finite" (bool: the
    loss and every new parameter are finite) and "input_finite" ((N,) bool: each sample's image)."""

    def loss_fn(params):
        logits, attention = nnx.merge(state.graphdef, params)(batch["image"])
        return total_loss(logits, attention, batch["label"].astype(jnp.int32), loss_cfg, output)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Leaf by leaf: a norm of large but finite parameters could itself overflow.
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    input_finite = jnp.all(jnp.isfinite(batch["image"]), axis=tuple(range(1, batch["image"].ndim)))
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "finite": finite,
               "input_finite": input_finite}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclasses.dataclass(frozen=True)
class ShardedSteps:
    """The train state's functions for one config on one mesh, each jitted once:
    init() -> a new state, created on the devices and replicated;
    abstract: the state's shapes, dtypes and shardings (to restore a checkpoint into, or to compile);
    step(state, batch) -> (state, metrics), the state donated, the batch split over the mesh."""
    init: Any
    abstract: TrainState
    step: Any


def sharded_steps(config, mesh) -> ShardedSteps:
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    tx = make_optimizer(config.optim, config.train.steps)
    init = functools.partial(init_state, config.seed, config.model, tx)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(init))
    step = jax.jit(functools.partial(train_step, loss_cfg=config.loss, output=config.model.output),
                   in_shardings=(replicated, batch), out_shardings=(replicated, replicated), donate_argnums=0)
    return ShardedSteps(jax.jit(init, out_shardings=replicated), abstract, step)


def abstract_batch(config, mesh) -> dict:
    """ShapeDtypeStructs of one global training batch, sharded over the mesh."""
    batch = sharding.batch_sharding(mesh)
    shape = (config.train.batch_size,) + tuple(config.data.patch)
    return {"image": jax.ShapeDtypeStruct(shape + (config.model.in_channels,), jnp.float32, sharding=batch),
            "label": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=batch)}
