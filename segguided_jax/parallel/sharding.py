"""The device mesh, the shardings of batches and state, and host batches -> global arrays.

The mesh has a "data" axis (the batch is split over it) and a "spatial" axis (each patch's first
spatial dimension is split over it, so one volume can span several devices; XLA inserts the halo
exchanges for convolutions and the reductions for instance norm). The train state is replicated.
A spatial group never spans processes (make_mesh).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SPATIAL_AXIS = "spatial"


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """A (data, spatial) mesh over every device of every process. mesh_cfg.spatial devices share
    each patch; mesh_cfg.data = -1 gives the data axis the rest. No mesh_cfg: every device on the
    data axis (inference). devices: another device list than jax.devices() (e.g. a TPU topology's
    devices, to compile for it without having it).

    Every spatial group lies on one process: each process reads its own rows (the pipeline shards
    the cases by process), so the devices sharing a patch must be fed by one process. The layout
    follows the physical topology (neighbouring chips share a patch); where that puts a group
    across processes (e.g. spatial 4 on a v5p slice of 2x2x1-chip hosts), each process's devices
    are laid out on their own and the processes stacked along the data axis."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    spatial = 1 if mesh_cfg is None else mesh_cfg.spatial
    data = n // spatial if mesh_cfg is None or mesh_cfg.data <= 0 else mesh_cfg.data
    if data * spatial != n:
        raise ValueError(f"mesh data={mesh_cfg.data} x spatial={spatial} does not match the {n} devices")
    grid = mesh_utils.create_device_mesh((data, spatial), devices, allow_split_physical_axes=True)
    if spatial_groups_span_processes(grid):
        processes = sorted({d.process_index for d in devices})
        local = n // len(processes)
        if local % spatial or any(sum(d.process_index == p for d in devices) != local for p in processes):
            raise ValueError(f"mesh.spatial={spatial} must divide the {local} devices of each of the "
                             f"{len(processes)} processes: the devices sharing a patch must sit on one process")
        grid = mesh_utils.create_hybrid_device_mesh((local // spatial, spatial), (len(processes), 1), devices,
                                                    process_is_granule=True, allow_split_physical_axes=True)
    return Mesh(grid, (DATA_AXIS, SPATIAL_AXIS))


def spatial_groups_span_processes(grid) -> bool:
    """Whether any row of a (data, spatial) device grid holds devices of several processes."""
    return any(len({d.process_index for d in row}) > 1 for row in grid)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(N, D, ...) arrays: batch over the data axis, D over the spatial axis, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS, SPATIAL_AXIS))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """(N, ...) arrays: batch over the data axis, whole on every device of a spatial group."""
    return NamedSharding(mesh, P(DATA_AXIS))


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


@dataclasses.dataclass(frozen=True)
class RaggedRows:
    """How a batch key whose rows arrive as one host array (N, ...), the rows one after another,
    goes to the devices: as (rows, slot, ...) with each row at the start of a slot of its own (the
    rest 0), laid out by `sharding`. Rows' offsets come from the batch's "box"[:, 0] and their
    lengths are the products of "box"[:, 4:7] (data.augment_on_device's boxes). Only the rows' own
    bytes cross to the device, in pieces of a multiple of `slot / 64` elements, so that a few
    small programs place any row without a compile per length."""
    sharding: NamedSharding
    slot: int


def global_batch(host_batch: dict, mesh: Mesh, shardings: dict | None = None) -> dict:
    """This process's numpy batch (its share of the rows of the global batch, whole along every
    other axis) -> global jax.Arrays, each key with its sharding in `shardings` (default
    batch_sharding; a RaggedRows for keys whose rows arrive concatenated). The global shape is
    stated rather than inferred from the sharding: every process holds batch / process_count whole
    rows, and a batch that does not fit that fails here."""
    out = {}
    for key, value in host_batch.items():
        sharding = batch_sharding(mesh) if shardings is None else shardings[key]
        if isinstance(sharding, RaggedRows):
            box = np.asarray(host_batch["box"])
            out[key] = _ragged_rows(np.asarray(value), box[:, 0], np.prod(box[:, 4:7], axis=1), sharding)
            continue
        shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def _ragged_rows(data: np.ndarray, offsets, lengths, spec: RaggedRows) -> jax.Array:
    rows = len(offsets)
    if np.any(lengths > spec.slot) or np.any(offsets + lengths > len(data)):
        raise ValueError(f"rows of lengths {lengths.tolist()} at offsets {offsets.tolist()} do not fit slots of "
                         f"{spec.slot} in an array of {len(data)}")
    trailing = data.shape[1:]
    shape = (rows * jax.process_count(), spec.slot) + trailing
    index = spec.sharding.addressable_devices_indices_map(shape)
    first = min(idx[0].indices(shape[0])[0] for idx in index.values())  # this process's first row
    piece = -(-spec.slot // 64)
    arrays = []
    for device, idx in index.items():
        start, stop, _ = idx[0].indices(shape[0])
        buf = jnp.zeros((stop - start, spec.slot) + trailing, data.dtype, device=device)
        for j, r in enumerate(range(start - first, stop - first)):
            row = data[offsets[r]: offsets[r] + lengths[r]]
            whole = len(row) // piece * piece
            parts = [(row[:whole], 0)] if whole else []
            if whole < len(row):  # the tail, padded to one piece
                tail = np.zeros((piece,) + trailing, data.dtype)
                tail[: len(row) - whole] = row[whole:]
                parts.append((tail, whole))
            for part, at in parts:
                buf = _place(buf, jax.device_put(part, device), np.int32(j), np.int32(at))
        arrays.append(buf)
    return jax.make_array_from_single_device_arrays(shape, spec.sharding, arrays)


@functools.partial(jax.jit, donate_argnums=0)
def _place(buf, part, row, at):
    """buf (rows, slot, ...) with part (n, ...) written into row `row` from element `at`."""
    return jax.lax.dynamic_update_slice(buf, part[None], (row, at) + (0,) * (buf.ndim - 2))