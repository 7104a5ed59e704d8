"""Residual blocks alone, forward and both gradients, compiled by the real TPU compiler (libtpu, no
TPU needed) as written and in the TPU formulation: the per-block figures of docs/tpu.md.

    python benchmarks/tpu_block.py [--topology=v5e:1x1] [--size=128] [--channels=32]
        [--in_channels=32] [--blocks=2] [--batch=2]

Prints, per formulation, the compiler's peak memory and temporaries, the bytes accessed and FLOPs
of its cost analysis and its cost model's time where valid: brats21's first stage by default
(--size=32 --channels=128 for its third). A whole step is compile_check's job; one block compiles
in seconds, which makes it the place to try a formulation first.
"""
from __future__ import annotations

import sys

from absl import app, flags

from segguided_jax.compilation import compile_check

_TOPOLOGY = flags.DEFINE_string("topology", "v5e:1x1", "TPU topology (its first chip is compiled for).")
_SIZE = flags.DEFINE_integer("size", 128, "Edge of the cubic activation.")
_CHANNELS = flags.DEFINE_integer("channels", 32, "Channels of the blocks.")
_IN = flags.DEFINE_integer("in_channels", None, "Channels into the first block (default: --channels).")
_BLOCKS = flags.DEFINE_integer("blocks", 2, "Blocks in a row.")
_BATCH = flags.DEFINE_integer("batch", 2, "Samples.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from segguided_jax.models import blocks
    from segguided_jax.models.formulations import Formulation

    jax.config.update("jax_enable_compilation_cache", False)
    cin = _IN.value or _CHANNELS.value

    def stack(fold):
        return nnx.List([blocks.ResidualBlock(cin if i == 0 else _CHANNELS.value, _CHANNELS.value, slope=0.01,
                                              dtype=jnp.bfloat16, rngs=nnx.Rngs(i),
                                              formulation=Formulation(tpu_fold=fold)) for i in range(_BLOCKS.value)])

    params = nnx.split(stack(True))[1]  # the same parameters for both forms
    shape = (_BATCH.value,) + (_SIZE.value,) * 3

    def loss_of(graphdef):
        def loss(params, x, w):
            y = x
            for block in nnx.merge(graphdef, params):
                y = block(y)
            return jnp.sum(y.astype(jnp.float32) * w)
        return loss

    with compile_check.libtpu_lock(3600):
        device = compile_check.topology_devices(_TOPOLOGY.value)[0]
        sharding = SingleDeviceSharding(device)
        spec = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
        args = (jax.tree.map(lambda p: spec(p.shape, p.dtype), params), spec(shape + (cin,), jnp.bfloat16),
                spec(shape + (_CHANNELS.value,), jnp.float32))
        activation = _BATCH.value * _SIZE.value ** 3 * _CHANNELS.value * 2
        print(f"{_BLOCKS.value} residual block(s) {cin}->{_CHANNELS.value} channels at {_SIZE.value}³, batch "
              f"{_BATCH.value}, bf16, forward and both gradients, {device.device_kind} ({_TOPOLOGY.value})")
        for name, fold in (("as written", False), ("TPU formulation", True)):
            # Lowered for TPU, the TPU branch is taken; without the fold it is the block as written.
            step = jax.jit(jax.grad(loss_of(nnx.split(stack(fold))[0]), argnums=(0, 1)))
            try:
                compiled = step.lower(*args).compile()
            except Exception as e:  # the compiler refuses a program larger than the chip's HBM
                if not compile_check._out_of_memory(e):
                    raise
                print(f"  {name}: does not fit: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            r = compile_check.measure(compiled, topology=_TOPOLOGY.value, what="train", chips=1, hosts=1, data=1,
                                      spatial=1, batch=_BATCH.value, chip=compile_check.CHIPS.get(device.device_kind))
            cost = f"{r.cost_model_s * 1e3:.1f} ms" if r.cost_model_s else "not valid"
            print(f"  {name}: peak {r.peak / 2**30:.2f} GiB (temporaries {r.temporaries / 2**30:.2f}), "
                  f"{r.bytes_accessed / 2**30:.2f} GiB accessed ({r.bytes_accessed / activation:.0f} activations), "
                  f"{r.flops / 1e12:.2f} TFLOP, cost model {cost}", flush=True)


if __name__ == "__main__":
    _topologies = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")]
    compile_check.prepare_tpu_environment(_topologies[0] if _topologies else "v5e:1x1")
    app.run(main)
