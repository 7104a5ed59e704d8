"""The device mesh, the shardings of batches and state, and host batches -> global arrays.

The mesh has a "data" axis (the batch is split over it) and a "spatial" axis (each patch's first
spatial dimension is split over it, so one volume can span several devices; XLA inserts the halo
exchanges for convolutions and the reductions for instance norm). The train state is replicated.
"""
from __future__ import annotations

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SPATIAL_AXIS = "spatial"


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """A (data, spatial) mesh over every device of every process. mesh_cfg.spatial devices share
    each patch; mesh_cfg.data = -1 gives the data axis the rest. Devices of a spatial group are
    neighbours in jax.devices() order, so they sit on one host. No mesh_cfg: every device on the
    data axis (inference). devices: another device list than jax.devices() (e.g. a TPU topology's
    devices, to compile for it without having it)."""
    n = jax.device_count() if devices is None else len(devices)
    spatial = 1 if mesh_cfg is None else mesh_cfg.spatial
    data = n // spatial if mesh_cfg is None or mesh_cfg.data <= 0 else mesh_cfg.data
    if data * spatial != n:
        raise ValueError(f"mesh data={mesh_cfg.data} x spatial={spatial} does not match the {n} devices")
    devices = mesh_utils.create_device_mesh((data, spatial), devices, allow_split_physical_axes=True)
    return Mesh(devices, (DATA_AXIS, SPATIAL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(N, D, ...) arrays: batch over the data axis, D over the spatial axis, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS, SPATIAL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, patch, mesh: Mesh, downsampling: int) -> None:
    """Fails early, with the numbers, when a batch cannot be laid out on the mesh."""
    data, spatial = mesh.shape[DATA_AXIS], mesh.shape[SPATIAL_AXIS]
    if global_batch % data or global_batch % jax.process_count():
        raise ValueError(f"train.batch_size={global_batch} must be divisible by the {data} devices of the data "
                         f"axis and the {jax.process_count()} processes")
    if patch[0] % (spatial * downsampling):
        raise ValueError(f"data.patch[0]={patch[0]} must be divisible by mesh.spatial={spatial} times the "
                         f"network's downsampling {downsampling}, so every device holds whole coarse voxels")


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch (its share of the global batch) -> global jax.Arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}
