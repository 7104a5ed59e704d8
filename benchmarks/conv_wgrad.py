"""Weight gradient of a 3³ stride-1 convolution on this machine: XLA's own lowering against
formulations.conv3_weight_grad_scan, side by side in one process.

    python benchmarks/conv_wgrad.py [--shapes=64x16x16,32x32x32] [--repeats=5]

Each shape is EDGExC_INxC_OUT at batch 2; prints median wall and process-CPU milliseconds and the
largest relative difference between the two results. The XLA_FLAGS of the environment apply
(launch/env.sh sets the oneDNN ones on jax >= 0.12).
"""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from segguided_jax.models.formulations import DN, conv3_weight_grad_scan

_SHAPES = flags.DEFINE_list("shapes", ["64x16x16", "32x32x32"], "EDGExC_INxC_OUT per case.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")


def timed(f, *args, repeats):
    out = jax.block_until_ready(f(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu), out


def main(argv):
    del argv
    print(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '-')}")
    for shape in _SHAPES.value:
        edge, cin, cout = (int(v) for v in shape.split("x"))
        x = jax.random.normal(jax.random.key(0), (2, edge, edge, edge, cin))
        g = jax.random.normal(jax.random.key(1), (2, edge, edge, edge, cout))
        kernel = jnp.zeros((3, 3, 3, cin, cout))

        @jax.jit
        def xla(x, g):
            conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=DN)
            return jax.vjp(conv, kernel)[1](g)[0]

        scan = jax.jit(conv3_weight_grad_scan)
        w_xla, c_xla, ref = timed(xla, x, g, repeats=_REPEATS.value)
        w_scan, c_scan, out = timed(scan, x, g, repeats=_REPEATS.value)
        err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        print(f"{edge}^3 x {cin} -> {cout}: XLA {w_xla:.0f} ms (CPU {c_xla:.0f}), scan {w_scan:.0f} ms "
              f"(CPU {c_scan:.0f}); wall ratio scan/XLA {w_scan / w_xla:.2f}; max rel. difference {err:.1e}", flush=True)


if __name__ == "__main__":
    app.run(main)
