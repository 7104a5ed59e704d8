"""Checks that need several devices, run by test_sharding.py in a child process with 4 fake CPU
devices (the flag must be set before JAX starts). Prints one JSON object of results."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import tiny  # noqa: E402
from segguided_jax import sharding  # noqa: E402
from segguided_jax.inference import VolumePredictor, window_outputs  # noqa: E402
from segguided_jax.models.network import forward  # noqa: E402
from segguided_jax.optim import make_optimizer  # noqa: E402
from segguided_jax.steps import init_state, train_step  # noqa: E402


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

    # A spatially sharded train step runs and matches the unsharded one.
    step = functools.partial(train_step, loss_cfg=cfg.loss, output=cfg.model.output)
    batch = {"image": x, "label": labels}
    _, ref_metrics = jax.jit(step)(state, batch)
    _, sh_metrics = jax.jit(step, in_shardings=(sharding.replicated(m), sharding.batch_sharding(m)),
                            out_shardings=(sharding.replicated(m), sharding.replicated(m)))(
        jax.device_put(state, sharding.replicated(m)), sharding.global_batch(batch, m))
    out["spatial_step_loss"] = [float(ref_metrics["loss"]), float(sh_metrics["loss"])]

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
