"""Mesh layouts on multi-host TPU slices, without TPUs: run by test_sharding.py in a child process,
because the TPU compiler's library (libtpu, argv[1]) must be named before JAX starts. A topology's
devices carry their coordinates and process_index, and building a Mesh over them needs no TPU.
Prints one JSON object of results."""
import os
import sys

os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # no cloud metadata server to ask here
os.environ["TPU_LIBRARY_PATH"] = sys.argv[1]

import json  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from jax.experimental import mesh_utils  # noqa: E402

from segguided_jax.parallel import sharding  # noqa: E402
from segguided_jax.compilation.compile_check import topology_devices  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# (topology, chips per host): v5e hosts hold 4 chips here (2x2), v5p hosts 4 (2x2x1).
TOPOLOGIES = ("v5e:2x4", "v5e:4x4", "v5p:4x4x4")


def layout(mesh, devices) -> dict:
    grid = mesh.devices
    processes = sorted({d.process_index for d in devices})
    rows_per_process = [sum(1 for row in grid if row[0].process_index == p) for p in processes]
    physical = mesh_utils.create_device_mesh(grid.shape, devices, allow_split_physical_axes=True)
    return {
        "devices": len(devices),
        "processes": len(processes),
        "each_device_once": sorted(d.id for d in grid.flat) == sorted(d.id for d in devices),
        "groups_across_processes": sum(len({d.process_index for d in row}) > 1 for row in grid),
        "physical_groups_across_processes": sum(len({d.process_index for d in row}) > 1 for row in physical),
        "kept_physical_layout": bool((grid == physical).all()),
        "rows_per_process": sorted(set(rows_per_process)),
    }


def main():
    out = {}
    for name in TOPOLOGIES:
        devices = topology_devices(name)
        for spatial in (1, 2, 4):
            cfg = ml_collections.ConfigDict({"data": -1, "spatial": spatial})
            out[f"{name} spatial={spatial}"] = layout(sharding.make_mesh(cfg, devices), devices)
    devices = topology_devices("v5p:4x4x4")
    try:
        sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "spatial": 8}), devices)
        out["v5p:4x4x4 spatial=8 error"] = None
    except ValueError as e:
        out["v5p:4x4x4 spatial=8 error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
