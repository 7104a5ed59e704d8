"""The train state, the pure step function, and their one jitted, sharded form."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from segguided_jax import sharding
from segguided_jax.data.augment import initial_patch_size
from segguided_jax.data.device_augment import augment_boxes, draws_size
from segguided_jax.losses import total_loss
from segguided_jax.models.network import build_model
from segguided_jax.optim import make_optimizer

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


def loss_and_grads(state: TrainState, batch: dict, *, loss_cfg, output: str):
    """((loss, {"loss_seg", "loss_aux"}), gradients with respect to state.params) on batch."""

    def loss_fn(params):
        logits, attention = nnx.merge(state.graphdef, params)(batch["image"])
        return total_loss(logits, attention, batch["label"].astype(jnp.int32), loss_cfg, output)

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def train_step(state: TrainState, batch: dict, *, loss_cfg, output: str):
    """One optimizer step on batch {"image": (N, D, H, W, 4) float32, "label": (N, D, H, W) uint8}.

    Returns (new state, metrics): scalars "loss", "loss_seg", "loss_aux", "grad_norm", and two
    checks computed on the devices so the host need not look at every step: "finite" (bool: the
    loss and every new parameter are finite) and "input_finite" ((N,) bool: each sample's image)."""

    (loss, parts), grads = loss_and_grads(state, batch, loss_cfg=loss_cfg, output=output)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Leaf by leaf: a norm of large but finite parameters could itself overflow.
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    input_finite = jnp.all(jnp.isfinite(batch["image"]), axis=tuple(range(1, batch["image"].ndim)))
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "finite": finite,
               "input_finite": input_finite}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def augmented_train_step(state: TrainState, batch: dict, *, data_cfg, patch_sharding=None, **step_kw):
    """train_step on what the host ships with data.augment_on_device: {"image": (N, S, C) and
    "label": (N, S) each row's box of its enlarged crop as stored, in a slot of its own; "box": (N,
    7) int32; "norm": (N, C, 2) float32; "augment": (N, A) float32 draws} are made into augmented
    patches of data.patch on the device first (device_augment.augment_boxes). patch_sharding: where
    the patches go (the mesh's batch sharding), so that the network's activations are split as on
    the CPU path's batches. Returns train_step's (new state, metrics)."""
    image, label = augment_boxes(batch["image"], batch["label"], batch["box"], batch["norm"], batch["augment"],
                                 data_cfg)
    if patch_sharding is not None:
        image = jax.lax.with_sharding_constraint(image, patch_sharding)
        label = jax.lax.with_sharding_constraint(label, patch_sharding)
    return train_step(state, {"image": image, "label": label}, **step_kw)


def crop_slot(data_cfg) -> int:
    """Voxels of the largest box a row can ship with data.augment_on_device: the whole enlarged
    crop (augment.initial_patch_size)."""
    return math.prod(int(s) for s in initial_patch_size(data_cfg.patch, data_cfg.augment))


@dataclasses.dataclass(frozen=True)
class ShardedSteps:
    """The train state's functions for one config on one mesh, each jitted once:
    init() -> a new state, created on the devices and replicated;
    abstract: the state's shapes, dtypes and shardings (to restore a checkpoint into, or to compile);
    step(state, batch) -> (state, metrics), the state donated, the batch split over the mesh;
    batch: the sharding of each key of a training batch (for sharding.global_batch)."""
    init: Any
    abstract: TrainState
    step: Any
    batch: dict


def batch_shardings(config, mesh) -> dict:
    """Per key of a training batch: patches split over data and spatial; with
    data.augment_on_device the boxes (each row in a slot of its own: sharding.RaggedRows), their
    geometry and draws over data only (each device of a spatial group holds its rows' whole boxes:
    the rotation reads across the spatial split)."""
    if config.data.augment_on_device:
        rows = sharding.rows_sharding(mesh)
        slots = sharding.RaggedRows(rows, crop_slot(config.data))
        return {"image": slots, "label": slots, "box": rows, "norm": rows, "augment": rows}
    patches = sharding.batch_sharding(mesh)
    return {"image": patches, "label": patches}


def sharded_steps(config, mesh) -> ShardedSteps:
    replicated, batch = sharding.replicated(mesh), batch_shardings(config, mesh)
    tx = make_optimizer(config.optim, config.train.steps)
    init = functools.partial(init_state, config.seed, config.model, tx)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(init))
    step_fn = functools.partial(train_step, loss_cfg=config.loss, output=config.model.output)
    if config.data.augment_on_device:
        step_fn = functools.partial(augmented_train_step, data_cfg=config.data.copy_and_resolve_references(),
                                    patch_sharding=sharding.batch_sharding(mesh), loss_cfg=config.loss,
                                    output=config.model.output)
    step = jax.jit(step_fn, in_shardings=(replicated, _placed(batch)), out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options=compiler_options(config.model))
    return ShardedSteps(jax.jit(init, out_shardings=replicated), abstract, step, batch)


# model.gpu_conv_layout -> XLA options of the train step's compile. Options a backend does not use
# leave its program as it was (the CPU and TPU programs stay the same either way).
_GPU_CONV_LAYOUTS = {"default": {}, "channels_last": {"xla_gpu_force_conv_nhwc": True}}


def compiler_options(model_cfg) -> dict | None:
    """XLA options for the jitted train step, from the model config. "channels_last" hands cuDNN
    the 3D convolutions channels-last, as the activations are, instead of XLA's channels-first
    layout with transposes around each one (docs/gpu.md: 10 % less at the roofline for brats21 on
    an H100, untimed on a device)."""
    layout = model_cfg.get("gpu_conv_layout", "default")
    if layout not in _GPU_CONV_LAYOUTS:
        raise ValueError(f"model.gpu_conv_layout must be one of {sorted(_GPU_CONV_LAYOUTS)}, got {layout!r}")
    return _GPU_CONV_LAYOUTS[layout] or None


def abstract_batch(config, mesh) -> dict:
    """ShapeDtypeStructs of one global training batch, sharded over the mesh (with
    data.augment_on_device the boxes' slots, geometry, statistics and draws)."""
    shardings = batch_shardings(config, mesh)
    rows, channels = config.train.batch_size, config.model.in_channels
    if config.data.augment_on_device:
        slot = crop_slot(config.data)
        dtype = jnp.dtype(config.data.device_crop_dtype)
        batch = {"image": jax.ShapeDtypeStruct((rows, slot, channels), dtype),
                 "label": jax.ShapeDtypeStruct((rows, slot), jnp.uint8),
                 "box": jax.ShapeDtypeStruct((rows, 7), jnp.int32),
                 "norm": jax.ShapeDtypeStruct((rows, channels, 2), jnp.float32),
                 "augment": jax.ShapeDtypeStruct((rows, draws_size(channels)), jnp.float32)}
    else:
        shape = (rows,) + tuple(int(s) for s in config.data.patch)
        batch = {"image": jax.ShapeDtypeStruct(shape + (channels,), jnp.float32),
                 "label": jax.ShapeDtypeStruct(shape, jnp.uint8)}
    placed = _placed(shardings)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[k]) for k, v in batch.items()}


def _placed(shardings: dict) -> dict:
    """batch_shardings as the device arrays are laid out (a RaggedRows key by its slots' sharding)."""
    return {k: v.sharding if isinstance(v, sharding.RaggedRows) else v for k, v in shardings.items()}


