"""Train-step throughput and memory for a config on whatever accelerator JAX finds.

    python benchmarks/train_step.py --config=configs/brats21.py [--config.key=value ...] \
        [--steps=20] [--upsample=transpose,resize]

Runs the real jitted train step (steps.train_step) on a random batch of the config's patch size
and batch size; prints compile seconds, steady-state step seconds, patches/s and peak device
memory, once per upsampling mode.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from segguided_jax.models.network import abstract_model, gate_parameter_count, parameter_count
from segguided_jax.training.optim import make_optimizer
from segguided_jax.training.steps import init_state, train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
_UPSAMPLE = flags.DEFINE_list("upsample", ["transpose", "resize"], "Upsampling modes to compare.")


def bench(config, steps: int) -> dict:
    b, patch = config.train.batch_size, tuple(config.data.patch)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((b,) + patch + (4,), np.float32)),
             "label": jnp.asarray(rng.integers(0, 4, (b,) + patch), jnp.uint8)}
    tx = make_optimizer(config.optim, config.train.steps)
    state = jax.jit(functools.partial(init_state, config.seed, config.model, tx))()
    step = jax.jit(functools.partial(train_step, loss_cfg=config.loss, output=config.model.output),
                   donate_argnums=0)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for _ in range(3):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / steps
    stats = jax.devices()[0].memory_stats() or {}
    return {"compile_s": compile_s, "step_s": step_s, "patches_per_s": b / step_s,
            "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30}


def main(argv):
    del argv
    config = _CONFIG.value
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    model = abstract_model(config.model)
    print(f"parameters {parameter_count(model)}, gates {gate_parameter_count(model)}; "
          f"batch {config.train.batch_size} x {tuple(config.data.patch)}, {config.model.compute_dtype}")
    for mode in _UPSAMPLE.value:
        config.model.upsample = mode
        r = bench(config, _STEPS.value)
        print(f"upsample={mode:9s} compile {r['compile_s']:.1f} s | step {1000 * r['step_s']:.1f} ms | "
              f"{r['patches_per_s']:.2f} patches/s | peak {r['peak_gib']:.2f} GiB", flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
