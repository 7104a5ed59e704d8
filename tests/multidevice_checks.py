"""Checks that need several devices, run by test_sharding.py in a child process with 4 fake CPU
devices (the flag must be set before JAX starts). Prints one JSON object of results."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import tiny  # noqa: E402
from segguided_jax.parallel import sharding  # noqa: E402
from segguided_jax.data import device_augment  # noqa: E402
from segguided_jax.data.augment import initial_patch_size  # noqa: E402
from segguided_jax.inference.predictor import VolumePredictor, window_outputs  # noqa: E402
from segguided_jax.models.network import forward  # noqa: E402
from segguided_jax.training.optim import make_optimizer  # noqa: E402
from segguided_jax.training.steps import abstract_batch, init_state, loss_and_grads, sharded_steps  # noqa: E402


def mesh(data, spatial):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": data, "spatial": spatial}))


def main(ckpt_dir):
    assert jax.device_count() == 4
    cfg = tiny.get_config()
    tx = make_optimizer(cfg.optim, 10)
    state = jax.jit(functools.partial(init_state, 0, cfg.model, tx))()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 16, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 16, 16, 16)).astype(np.uint8)
    out = {}

    # Spatially sharded forward (each patch split in 2 along D) == unsharded forward.
    fwd = functools.partial(window_outputs, state.graphdef, output="regions", attention_stages=(-1,))
    reference = np.asarray(jax.jit(fwd)(state.params, x))
    m = mesh(2, 2)
    sharded = jax.jit(fwd, in_shardings=(sharding.replicated(m), sharding.batch_sharding(m)),
                      out_shardings=sharding.batch_sharding(m))(state.params, jax.device_put(x, sharding.batch_sharding(m)))
    out["spatial_forward_max_abs_diff"] = float(np.max(np.abs(np.asarray(sharded) - reference)))
    out["spatial_forward_shards"] = len(sharded.addressable_shards)

    # The real sharded step on a (data 2, spatial 2) mesh against the same step on one device:
    # loss, gradients and the parameters after 3 steps agree, and the activations stay split.
    batch = {"image": x, "label": labels}
    one = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "spatial": 1}), jax.devices()[:1])
    out["spatial_step"] = {}
    for name, m in (("one", one), ("spatial", mesh(2, 2))):
        fns = sharded_steps(cfg, m)
        compiled = fns.step.lower(fns.abstract, abstract_batch(cfg, m)).compile()
        hlo = compiled.as_text()
        s = fns.init()
        global_batch = sharding.global_batch(batch, m, fns.batch)
        losses = []
        for _ in range(3):
            s, metrics = compiled(s, global_batch)
            losses.append(float(metrics["loss"]))
        grad_fn = jax.jit(functools.partial(loss_and_grads, loss_cfg=cfg.loss, output=cfg.model.output),
                          in_shardings=(sharding.replicated(m), fns.batch), out_shardings=sharding.replicated(m))
        grads = grad_fn(fns.init(), global_batch)[1]
        out["spatial_step"][name] = {
            "losses": losses,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            # Values of the full-resolution stages holding a whole patch depth (16) rather than a
            # device's half of it (8): the activations the spatial split is meant to divide.
            "whole_depth_values": len(re.findall(r"\[\d+,16,16,16,\d+\]", hlo)),
            "half_depth_values": len(re.findall(r"\[\d+,8,16,16,\d+\]", hlo)),
        }
        out["spatial_step"][name]["_grads"] = [np.asarray(g) for g in jax.tree.leaves(grads)]
        out["spatial_step"][name]["_params"] = [np.asarray(p) for p in jax.tree.leaves(s.params)]
    ref, sh = out["spatial_step"]["one"], out["spatial_step"]["spatial"]
    initial = [np.asarray(p) for p in jax.tree.leaves(state.params)]  # the same seed's parameters
    out["spatial_step"]["param_change_max_abs"] = max(float(np.max(np.abs(u - v))) for u, v in zip(ref["_params"], initial))
    for key in ("grads", "params"):
        a, b = ref.pop("_" + key), sh.pop("_" + key)
        out["spatial_step"][key + "_max_abs_diff"] = max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))
        out["spatial_step"][key + "_max_abs"] = max(float(np.max(np.abs(u))) for u in a)

    # data.augment_on_device on (data 2, spatial 2): crops over the data axis, patches made on the
    # devices and split over the spatial axis; the same step as on one device.
    aug_cfg = tiny.get_config()
    aug_cfg.data.augment_on_device = True
    aug_cfg.data.augment.rotation_probability = aug_cfg.data.augment.scale_probability = 1.0
    size = initial_patch_size(aug_cfg.data.patch, aug_cfg.data.augment)
    draws = np.stack([device_augment.draw(rng, aug_cfg.data.augment, 4) for _ in range(2)])
    reach = [device_augment.reach(d, aug_cfg.data.patch, size, 4) for d in draws]
    lengths = [int(np.prod(edges)) for _, edges in reach]
    crops = {"image": rng.integers(-500, 3000, (sum(lengths), 4)).astype(np.int16),
             "label": rng.integers(0, 4, sum(lengths)).astype(np.uint8),
             "box": np.array([[sum(lengths[:i]), *lo, *edges] for i, (lo, edges) in enumerate(reach)], np.int32),
             "norm": np.tile(np.array([[800.0, 200.0]], np.float32), (2, 4, 1)),
             "augment": draws}
    out["augment_on_device_step"] = {}
    for name, m in (("one", one), ("spatial", mesh(2, 2))):
        fns = sharded_steps(aug_cfg, m)
        _, metrics = fns.step(fns.init(), sharding.global_batch(crops, m, fns.batch))
        out["augment_on_device_step"][name] = [float(metrics["loss"]), float(metrics["grad_norm"])]

    # Sliding windows spread over 4 devices == on 1 device.
    volume = rng.standard_normal((30, 21, 17, 4)).astype(np.float32)
    kw = dict(window=(16, 16, 16), overlap=0.5, batch_size=4, attention_stages=(-1,))
    fwd = functools.partial(forward, state.graphdef, output="regions")
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), (sharding.DATA_AXIS, sharding.SPATIAL_AXIS))
    p1 = VolumePredictor(fwd, state.params, one_device, **kw)(volume)
    p4 = VolumePredictor(fwd, state.params, mesh(4, 1), **kw)(volume)
    out["windows_1_vs_4_max_abs_diff"] = float(np.max(np.abs(p1 - p4)))

    # A checkpoint written from 4 devices, for test_sharding to restore on 1.
    state4 = jax.device_put(state, sharding.replicated(mesh(4, 1)))
    with ocp.CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state4)))
        mgr.wait_until_finished()
    out["param_sum"] = float(sum(jnp.sum(p) for p in jax.tree.leaves(state.params)))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
