"""Compile the train step for a config and a device count without running it; print memory.

    python -m segguided_jax.compile_check --config=configs/brats21.py [--devices 8] [--config.key=value ...]

With --devices N on a CPU machine, N fake CPU devices stand in for the accelerators, so a user
learns before renting hardware what one device must hold (XLA's memory analysis of the compiled
step: arguments, outputs, temporaries) and how many bytes each step all-reduces between devices.
CPU figures approximate an accelerator's: its compiler fuses and lays out differently.
"""
from __future__ import annotations

import os
import re
import sys


def _early_devices(argv) -> None:
    # The fake-device flag must reach XLA before JAX starts its CPU backend (at first use, not at
    # import), so it is read from argv before absl parses the flags.
    for i, a in enumerate(argv):
        if a.startswith("--devices"):
            n = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax
from absl import app, flags
from ml_collections import config_flags

from segguided_jax import sharding
from segguided_jax.models.network import abstract_model, parameter_count
from segguided_jax.steps import abstract_batch, sharded_steps

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1}


def all_reduce_bytes(hlo_text: str) -> int:
    """Bytes of the results of every all-reduce in an optimised HLO module (one device's share)."""
    total = 0
    for line in hlo_text.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def compile_train_step(config):
    """Lowers and compiles the jitted train step on abstract inputs. Returns the compiled step."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.train.batch_size, config.data.patch, mesh, 2 ** (len(config.model.widths) - 1))
    fns = sharded_steps(config, mesh)
    return fns.step.lower(fns.abstract, abstract_batch(config, mesh)).compile()


def main(argv):
    del argv
    config = flags.FLAGS.config
    compiled = compile_train_step(config)
    mem = compiled.memory_analysis()
    gib = 2 ** 30
    n = jax.device_count()
    print(f"{jax.devices()[0].platform} x{n} devices, mesh data={config.mesh.data} spatial={config.mesh.spatial}; "
          f"batch {config.train.batch_size} x {tuple(config.data.patch)}, {config.model.compute_dtype}; "
          f"{parameter_count(abstract_model(config.model))} parameters")
    if mem is not None:
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        print(f"per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, outputs "
              f"{mem.output_size_in_bytes / gib:.2f} GiB (aliased {mem.alias_size_in_bytes / gib:.2f}), temporaries "
              f"{mem.temp_size_in_bytes / gib:.2f} GiB, code {mem.generated_code_size_in_bytes / 2**20:.1f} MiB; "
              f"peak about {total / gib:.2f} GiB")
    print(f"all-reduced per step, per device: {all_reduce_bytes(compiled.as_text()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module (tests, tools)
    # does not clash with segguided_jax.main's --config.
    _early_devices(sys.argv)
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_integer("devices", None, "Fake CPU devices to compile for (read before JAX starts).")
    flags.mark_flag_as_required("config")
    app.run(main)
