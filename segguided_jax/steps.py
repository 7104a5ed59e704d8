"""The train state and the pure step functions; train.py jits them once with shardings."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from segguided_jax.losses import total_loss
from segguided_jax.models.network import build_model


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
    Returns (new state, {"loss", "loss_seg", "loss_aux", "grad_norm"}) as scalars."""

    def loss_fn(params):
        logits, attention = nnx.merge(state.graphdef, params)(batch["image"])
        return total_loss(logits, attention, batch["label"].astype(jnp.int32), loss_cfg, output)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
