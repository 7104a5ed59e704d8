"""What XLA is asked to do in one train step, for a config, without running it: the CPU-side
view of an accelerator step (e.g. brats21's on a GPU, which this machine does not have).

    python benchmarks/hlo_cost.py --config=configs/brats21.py [--config.key=value ...]

    # before/after a change: the same script against another checkout's package and config
    PYTHONPATH=/path/to/other/checkout python benchmarks/hlo_cost.py --config=/path/to/other/checkout/configs/brats21.py

Prints, for the jitted `steps.train_step` at the config's batch and patch:
- the program's convolution and matmul FLOPs (counted from the jaxpr, so the same on any backend),
  split into convolutions and dots, and the number of each;
- StableHLO op counts as lowered (platform-independent: what every backend starts from);
- after XLA's CPU optimisation (run without XLA_FLAGS, so convolutions stay convolutions): HLO
  instruction counts by opcode, the number of fusions, XLA's cost analysis (FLOPs, bytes accessed)
  and memory analysis (temporaries).
GPU kernels differ from CPU ones, but FLOPs, the bytes the program must move and the number of
separate ops are what an accelerator step pays for too.
"""
from __future__ import annotations

import collections
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np


def program_flops(jaxpr) -> dict:
    """2·MACs of the convolutions and dot_generals of a jaxpr, sub-jaxprs included (a scan's body
    times its length; of a cond's branches, the costliest).
    Returns {"conv": flops, "dot": flops, "n_conv": count, "n_dot": count}."""
    out = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            branches = [program_flops(b.jaxpr) for b in eqn.params["branches"]]
            out.update(max(branches, key=lambda f: f.get("conv", 0) + f.get("dot", 0)))
            continue
        if eqn.primitive.name == "scan":
            body = program_flops(eqn.params["jaxpr"].jaxpr)
            out.update({k: v * eqn.params["length"] for k, v in body.items()})
            continue
        if eqn.primitive.name == "conv_general_dilated":
            rhs, dn = eqn.invars[1].aval, eqn.params["dimension_numbers"]
            kernel = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]]))
            # Output elements x kernel taps x input features per group.
            out["conv"] += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * kernel * rhs.shape[dn.rhs_spec[1]]
            out["n_conv"] += 1
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
            out["dot"] += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k
            out["n_dot"] += 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    out.update(program_flops(sub))
    return dict(out)


def stablehlo_op_counts(text: str) -> collections.Counter:
    return collections.Counter(re.findall(r"= (?:\"?)(stablehlo\.[a-z_]+|chlo\.[a-z_]+)", text))


def hlo_op_counts(text: str) -> collections.Counter:
    """Opcode counts of the entry computation and every fused/called computation of an HLO module."""
    return collections.Counter(re.findall(r"^\s*(?:ROOT )?%\S+ = \S+(?:\{[^}]*\})? ([a-z][a-z0-9\-]*)\(", text, re.M))


def main(argv):
    del argv
    from absl import flags

    from segguided_jax.models.network import abstract_model, parameter_count
    from segguided_jax.training.optim import make_optimizer
    from segguided_jax.training.steps import init_state, train_step

    config = flags.FLAGS.config
    # The CPU-only formulations off: the compiled program is then the one an accelerator gets.
    config.model.cpu_rewrites = False
    b, patch = config.train.batch_size, tuple(config.data.patch)
    tx = make_optimizer(config.optim, config.train.steps)
    state = jax.eval_shape(functools.partial(init_state, config.seed, config.model, tx))
    batch = {"image": jax.ShapeDtypeStruct((b,) + patch + (config.model.in_channels,), jnp.float32),
             "label": jax.ShapeDtypeStruct((b,) + patch, jnp.uint8)}
    fn = functools.partial(train_step, loss_cfg=config.loss, output=config.model.output)
    flops = program_flops(jax.make_jaxpr(fn)(state, batch).jaxpr)
    lowered = jax.jit(fn, donate_argnums=0).lower(state, batch)
    shlo = stablehlo_op_counts(lowered.as_text())
    compiled = lowered.compile()
    hlo = hlo_op_counts(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()

    m = config.model
    print(f"jax {jax.__version__}; {parameter_count(abstract_model(m))} parameters; batch {b} x {patch}, "
          f"{m.compute_dtype}, widths {tuple(m.widths)}, down_kernel {m.down_kernel}, upsample {m.upsample}")
    print(f"program: conv {flops.get('conv', 0) / 1e12:.3f} TFLOP in {flops.get('n_conv', 0)} convolutions, "
          f"dot {flops.get('dot', 0) / 1e12:.3f} TFLOP in {flops.get('n_dot', 0)} dot_generals; "
          f"total {(flops.get('conv', 0) + flops.get('dot', 0)) / 1e12:.3f} TFLOP")
    print(f"StableHLO: {sum(shlo.values())} ops; " + ", ".join(f"{k.split('.')[1]} {v}" for k, v in shlo.most_common(12)))
    print(f"optimised CPU HLO: {sum(hlo.values())} instructions, {hlo['fusion']} fusions, "
          f"{hlo['convolution']} convolutions, {hlo['dot']} dots, {hlo['transpose']} transposes, "
          f"{hlo['copy']} copies, {hlo['concatenate']} concatenates, {hlo['reduce']} reduces")
    print(f"XLA cost analysis: {cost.get('flops', 0) / 1e12:.3f} TFLOP, "
          f"{cost.get('bytes accessed', 0) / 2**30:.2f} GiB accessed, "
          f"{cost.get('transcendentals', 0) / 1e9:.2f} G transcendentals")
    if mem is not None:
        print(f"memory: temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB, arguments "
              f"{mem.argument_size_in_bytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    # XLA's own CPU flags (e.g. launch/env.sh's oneDNN rewrite, which hides convolutions inside
    # custom calls that cost analysis does not count) would make the figures depend on this
    # machine; the backend reads them at first use, after this.
    os.environ.pop("XLA_FLAGS", None)
    os.environ["SEGGUIDED_CPU_FLAGS"] = "none"  # nor the package's own (segguided_jax.runtime), if imported later
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
    flags.mark_flag_as_required("config")
    app.run(main)
