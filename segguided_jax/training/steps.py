"""The train state, the pure step function, and their one jitted, sharded form."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from segguided_jax.parallel import sharding
from segguided_jax.data.augment_plan import AugmentPlan
from segguided_jax.data.device_augment import augment_boxes
from segguided_jax.training.losses import total_loss
from segguided_jax.models.network import build_model
from segguided_jax.training.optim import make_optimizer

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


@dataclasses.dataclass(frozen=True)
class ShardedSteps:
    """The train state's functions for one config on one mesh, each jitted once:
    init() -> a new state, created on the devices and replicated;
    abstract: the state's shapes, dtypes and shardings (to restore a checkpoint into, or to compile);
    step(state, batch) -> (state, metrics), the state donated, the batch split over the mesh;
    batch: the sharding of each key of a training batch (for sharding.global_batch);
    plan: where the batch is augmented (the pipeline that feeds `step` takes the same plan)."""
    init: Any
    abstract: TrainState
    step: Any
    batch: dict
    plan: AugmentPlan


def batch_shardings(config, mesh, plan: AugmentPlan | None = None) -> dict:
    """Per key of a training batch: patches split over data and spatial; on the device path
    (plan.on_device; default: the plan of config.data) the boxes (each row in a slot of its own:
    sharding.RaggedRows), their geometry and draws over data only (each device of a spatial group
    holds its rows' whole boxes: the rotation reads across the spatial split)."""
    plan = AugmentPlan.from_data(config.data) if plan is None else plan
    if plan.on_device:
        rows = sharding.rows_sharding(mesh)
        slots = sharding.RaggedRows(rows, plan.slot)
        return {"image": slots, "label": slots, "box": rows, "norm": rows, "augment": rows}
    patches = sharding.batch_sharding(mesh)
    return {"image": patches, "label": patches}


def sharded_steps(config, mesh, plan: AugmentPlan | None = None) -> ShardedSteps:
    """The train state's functions for `config` on `mesh`; plan: where the batch is augmented
    (default: the plan of config.data)."""
    plan = AugmentPlan.from_data(config.data) if plan is None else plan
    replicated, batch = sharding.replicated(mesh), batch_shardings(config, mesh, plan)
    tx = make_optimizer(config.optim, config.train.steps)
    init = functools.partial(init_state, config.seed, config.model, tx)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(init))
    step_fn = functools.partial(train_step, loss_cfg=config.loss, output=config.model.output)
    if plan.on_device:
        step_fn = functools.partial(augmented_train_step, data_cfg=config.data.copy_and_resolve_references(),
                                    patch_sharding=sharding.batch_sharding(mesh), loss_cfg=config.loss,
                                    output=config.model.output)
    step = jax.jit(step_fn, in_shardings=(replicated, _placed(batch)), out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options=compiler_options(config.model))
    return ShardedSteps(jax.jit(init, out_shardings=replicated), abstract, step, batch, plan)


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


def abstract_batch(config, mesh, plan: AugmentPlan | None = None) -> dict:
    """ShapeDtypeStructs of one global training batch, sharded over the mesh (on the device path
    the boxes' slots, geometry, statistics and draws: AugmentPlan.batch_arrays)."""
    plan = AugmentPlan.from_data(config.data) if plan is None else plan
    placed = _placed(batch_shardings(config, mesh, plan))
    arrays = plan.batch_arrays(config.train.batch_size, config.model.in_channels)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=placed[k]) for k, (shape, dtype) in arrays.items()}


def _placed(shardings: dict) -> dict:
    """batch_shardings as the device arrays are laid out (a RaggedRows key by its slots' sharding)."""
    return {k: v.sharding if isinstance(v, sharding.RaggedRows) else v for k, v in shardings.items()}


