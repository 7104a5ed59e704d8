"""The train step with and without data.augment_on_device, compiled by the TPU compiler for a TPU
topology on a machine without TPUs (libtpu, deviceless ahead-of-time compilation): per-chip memory,
FLOPs and bytes accessed from XLA's TPU analyses.

    flock /tmp/segguided-libtpu.lock python benchmarks/tpu_augment.py --config=configs/brats21.py \
        --topology=v5e:1x1 [--config.train.batch_size=1 ...]

libtpu is the one launch/env.sh installs beside the venv (.venv/libtpu; a TPU VM's own libtpu
otherwise); one process at a time may hold it, hence the lock. A brats21 compile takes minutes.
With augment_on_device the step's input is, per row, a slot of the enlarged crop's size (augment.initial_patch_size)
holding the box its draws can read, as stored (data.device_crop_dtype), with the draws; the augmentation
to data.patch is part of the compiled step.
"""
from __future__ import annotations

import os
import sys

os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # no cloud metadata server to ask off a TPU VM
_LIBTPU = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
if os.path.exists(_LIBTPU):
    os.environ.setdefault("TPU_LIBRARY_PATH", _LIBTPU)

import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from segguided_jax.compilation import compile_check  # noqa: E402
from segguided_jax.parallel import sharding  # noqa: E402
from segguided_jax.data.augment import initial_patch_size  # noqa: E402
from segguided_jax.training.steps import abstract_batch, sharded_steps  # noqa: E402

jax.config.update("jax_platforms", "cpu")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:1x1", "TPU topology to compile for, e.g. v5e:1x1, v5p:2x2x1.")


def compile_step(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    fns = sharded_steps(config, mesh)
    return fns.step.lower(fns.abstract, abstract_batch(config, mesh)).compile()


def main(argv):
    del argv
    # Through compile_check, which declares the TPU to the formulations: programs traced from then on
    # get the TPU's folded formulation (models/formulations.py), as compile_check's own.
    devices = compile_check.topology_devices(_TOPOLOGY.value)
    gib = 2 ** 30
    base = _CONFIG.value
    print(f"{_TOPOLOGY.value}: {len(devices)} x {devices[0].device_kind}; batch {base.train.batch_size} x "
          f"{tuple(base.data.patch)}, {base.model.compute_dtype}; jax {jax.__version__}", flush=True)
    for on_device in (False, True):
        config = base.copy_and_resolve_references()
        config.unlock().data.augment_on_device = on_device
        size = initial_patch_size(config.data.patch, config.data.augment) if on_device else tuple(config.data.patch)
        what = (f"augment_on_device={on_device} (input: {config.data.device_crop_dtype} slots of {tuple(size)} voxels)"
                if on_device else f"augment_on_device={on_device} (input {tuple(size)})")
        t = time.time()
        try:
            compiled = compile_step(config, devices)
        except Exception as e:  # the compiler's out-of-memory names the sizes; print it and go on
            print(f"{what}: does not compile ({time.time() - t:.0f} s): {str(e).splitlines()[0][:400]}", flush=True)
            continue
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        print(f"{what}: compiled in {time.time() - t:.0f} s; per chip: peak {peak / gib:.2f} GiB (arguments "
              f"{mem.argument_size_in_bytes / gib:.2f}, temporaries {mem.temp_size_in_bytes / gib:.2f}); "
              f"{cost.get('flops', float('nan')) / 1e12:.2f} TFLOP, {cost.get('bytes accessed', float('nan')) / gib:.1f} GiB "
              f"accessed per step", flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
