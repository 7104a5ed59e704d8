"""Compiles an exported model's TPU lowering with the real TPU compiler, deviceless, on a CPU machine.

    flock /tmp/segguided-libtpu.lock env TPU_SKIP_MDS_QUERY=1 TPU_LIBRARY_PATH=.venv/libtpu/libtpu/libtpu.so \
        JAX_PLATFORMS=cpu python benchmarks/exported_tpu_compile.py MODEL.sgm [--topology v5e:1x1] [--batch 8]

The model file is read back as predict reads it (its function deserialised from the file alone),
and the function is compiled for one chip of the topology with a batch of --batch windows: proof
that the `tpu` lowering in the file is a program libtpu accepts. Prints the compile time and the
compiler's memory figures. launch/env.sh installs libtpu beside the venv (off JAX's import path);
libtpu serves one process at a time, hence the lock.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from segguided_jax.compilation import compile_check
from segguided_jax.inference import model_artefact


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--topology", default="v5e:1x1")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    t0 = time.time()
    metadata = model_artefact.read_metadata(args.model)
    exported = model_artefact.read_function(args.model)
    load_s = time.time() - t0
    device = compile_check.topology_devices(args.topology)[0]
    where = jax.sharding.SingleDeviceSharding(device)
    params = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where) for a in exported.in_avals[:-1]]
    x = jax.ShapeDtypeStruct((args.batch, *metadata["inference"]["window"], len(metadata["input"]["modalities"])),
                             np.float32, sharding=where)
    t0 = time.time()
    compiled = jax.jit(exported.call).trace(params, x).lower(lowering_platforms=("tpu",)).compile()
    memory = compiled.memory_analysis()
    print(json.dumps({"model": args.model, "platforms": list(exported.platforms), "topology": args.topology,
                      "device": str(device.device_kind), "batch": args.batch, "read_s": round(load_s, 2),
                      "compile_s": round(time.time() - t0, 1),
                      "memory_bytes": {k: getattr(memory, f"{k}_size_in_bytes")
                                       for k in ("argument", "output", "temp", "generated_code")}}, indent=1))


if __name__ == "__main__":
    main()
