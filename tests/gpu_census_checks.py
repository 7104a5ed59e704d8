"""Programs whose FLOPs, bytes and collectives are known, compiled for H100s without a GPU, run by
test_gpu_compile.py in a child process (the CUDA plugin must be found before JAX is imported).
Prints one JSON object: per program, the census next to the figures worked out by hand."""
import json
import sys

from segguided_jax.compilation import gpu_compile

gpu_compile.prepare_gpu_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main():
    out = {}
    devices = gpu_compile.gpu_devices("h100", "1x1x2")
    mesh = Mesh(np.array(devices), ("data",))
    # A 3x3x3 convolution, 8 -> 16 channels, on 16 x 16 x 32 x 32 voxels per GPU (batch 1 each),
    # and the gradient of its kernel: a forward and a backward-filter convolution, each
    # 2 x voxels x C_out x C_in x 27 FLOPs, and one all-reduce of the kernel's gradient, which XLA
    # places on the backward convolution's bfloat16 result, before the cast back to float32.
    x = jax.ShapeDtypeStruct((2, 16, 32, 32, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((3, 3, 3, 8, 16), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w.astype(jnp.bfloat16), (1, 1, 1), "SAME",
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
    c = gpu_compile.census(compiled.as_text())
    out["conv"] = {"flops": c.flops, "expected_flops": 2 * (2 * 16 * 32 * 32 * 16 * 8 * 27),
                   "count": c.count, "all_reduce_bytes": c.collective_bytes.get("all-reduce", 0),
                   "expected_all_reduce_bytes": 3 * 3 * 3 * 8 * 16 * 2,
                   "peak": compiled.memory_analysis().peak_memory_in_bytes}
    # A (4096 x 1024) @ (1024 x 512) matrix product on one GPU: 2 x 4096 x 512 x 1024 FLOPs; it
    # reads both operands and writes the result once.
    one = Mesh(np.array(gpu_compile.gpu_devices("h100", "1x1x1")), ("data",))
    a = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16, sharding=NamedSharding(one, P()))
    b = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(one, P()))
    c = gpu_compile.census(jax.jit(jnp.matmul).lower(a, b).compile().as_text())
    out["dot"] = {"flops": c.flops, "expected_flops": 2 * 4096 * 512 * 1024, "count": c.count,
                  "bytes_accessed": c.bytes_accessed, "expected_bytes": 2 * (4096 * 1024 + 1024 * 512 + 4096 * 512)}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
