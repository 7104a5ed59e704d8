"""Patch sampling for training, as nnU-Net v2's data loader does it (nnunetv2/training/dataloading/
data_loader.py: get_bbox, need_to_pad, _oversample_last_XX_percent), on decoded `records.Case`s.

- Foreground oversampling is a forced share of every batch: of a batch of B, the rows
  j >= round(B * (1 - foreground_fraction)) are centred on a foreground voxel (`foreground_rows`).
  For such a row a class is chosen uniformly among the classes present in the case
  (data.foreground_classes; default the sub-regions NCR, ED, ET), then one of its voxels uniformly
  (from the locations the record stores; see records.ForegroundLocations). Other rows, and cases
  without foreground, are placed uniformly.
- Placement leaves room past the borders as nnU-Net's need_to_pad: the enlarged patch (the box the
  rotation and scaling may read, `augment.initial_patch_size`) may stick out of the case by half
  its excess over the final patch on each side, so the final patch reaches every border. Where the
  case is smaller than the final patch the patch is centred on it. A foreground-centred patch is
  clipped to the same bounds on both sides (nnU-Net clips only the lower side, so near an upper
  border its patch can reach up to half a patch past it).
- The final patch is then resampled straight from the whole case through the drawn rotation and
  scaling (`augment.resample`): one interpolation of only the final patch's voxels, and real
  tissue wherever the case has it. Points outside the case read 0 (label 0).

Every random number comes from the Generator given (the pipeline derives it from the seed and the
position in the stream), never from global state.
"""
from __future__ import annotations

import numpy as np

from segguided_jax.data.augment import (augment_intensity, draw_spatial, initial_patch_size, mirror_channels_last,
                                       resample, source_points)
from segguided_jax.data import device_augment
from segguided_jax.data.records import Case


def foreground_rows(batch_size: int, fraction: float) -> int:
    """How many rows of a batch are forced onto foreground: nnU-Net's rule, row j is forced when
    j >= round(batch_size * (1 - fraction)) (Python's round, as nnU-Net), i.e. the last ones."""
    return batch_size - round(batch_size * (1 - fraction))


def choose_voxel(case: Case, classes, rng: np.random.Generator) -> np.ndarray | None:
    """A foreground voxel (3,) int64: a class uniform among `classes` (tuples of internal labels)
    present in the case, then a voxel of it; None when the case has none of them."""
    fg = case.foreground
    if fg is None:
        raise ValueError(f"case {case.case_id} has no label map: it cannot be a training case")
    present = fg.present(classes)
    if not present:
        return None
    return fg.sample(tuple(classes[present[int(rng.integers(len(present)))]]), rng)


def enlarged_start(shape, patch, initial, rng: np.random.Generator, voxel=None, overhang=0) -> np.ndarray:
    """Lower corner (3,) int64 of the enlarged box (edge `initial`) in case coordinates: nnU-Net's
    get_bbox. need = initial - patch, at least 2 * overhang (voxels the final patch may reach past
    each border), and more where the case is smaller than the patch; the start is uniform in
    [-need // 2, shape + need // 2 + need % 2 - initial], or, given a voxel, the start that centres
    the box on it, clipped to that range."""
    shape, patch, initial = (np.asarray(v, np.int64) for v in (shape, patch, initial))
    need = np.maximum(initial - patch, 2 * np.asarray(overhang, np.int64))
    need = np.where(need + shape < initial, initial - shape, need)
    lbs = -need // 2
    ubs = shape + need // 2 + need % 2 - initial
    if voxel is None:
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(lbs, ubs)], np.int64)
    return np.clip(np.asarray(voxel, np.int64) - initial // 2, lbs, ubs)


def overhang_voxels(data_cfg) -> np.ndarray:
    """data.patch_overhang in voxels per axis: how far a patch may reach past each border."""
    return np.round(np.asarray(data_cfg.patch, np.float64) * float(data_cfg.patch_overhang)).astype(np.int64)


def final_start(enlarged, patch, initial) -> np.ndarray:
    """Lower corner of the final patch: the centre of the enlarged box (integer, so that without
    rotation or scaling the final patch is a plain crop)."""
    return np.asarray(enlarged, np.int64) + (np.asarray(initial, np.int64) - np.asarray(patch, np.int64)) // 2


def train_patch(case: Case, rng: np.random.Generator, data_cfg, *, force_foreground: bool, out=None) -> dict:
    """One augmented training patch of `case`: {"image": (P, P, P, C) float32 (written into `out`
    when given), "label": (P, P, P) uint8}. Draws, in order: the foreground class and voxel (forced
    rows), the placement, the spatial transform, the intensity transforms, the mirroring."""
    patch = tuple(int(p) for p in data_cfg.patch)
    initial = initial_patch_size(patch, data_cfg.augment)
    voxel = choose_voxel(case, data_cfg.foreground_classes, rng) if force_foreground else None
    start = final_start(enlarged_start(case.shape, patch, initial, rng, voxel, overhang_voxels(data_cfg)), patch,
                        initial)
    matrix = draw_spatial(rng, data_cfg.augment)
    centre = start + (np.asarray(patch) - 1) / 2
    image, label = resample(case.channel_boxes, _label(case), case.shape, matrix, centre, patch)
    augment_intensity(image, rng, data_cfg.augment)
    image, label = mirror_channels_last(image, label, rng, data_cfg.augment, out=out)
    return {"image": image, "label": label}


def enlarged_crop(case: Case, rng: np.random.Generator, data_cfg, *, force_foreground: bool) -> dict:
    """What the host ships for one training patch augmented on the accelerator
    (segguided_jax.data.device_augment.augment_boxes): of the enlarged box (edge I =
    augment.initial_patch_size, the final patch at its centre, offset (I - P) // 2), only the part
    that this patch's drawn spatial transform can read (device_augment.reach), as the record
    stores it:
      image  (n, C) data.device_crop_dtype ("int16": the raw intensities; "float32": those, or a
             float32 record's normalised image), the box flattened in C order, 0 outside the case;
      label  (n,) uint8 likewise;
      box    (6,) int32: the box's lower corner in the enlarged box's coordinates, then its edges;
      norm   (C, 2) float32 (mean, std) that normalise it (records.Case.stored_box);
      augment (A,) float32 packed draws.
    The draws are train_patch's, in its order, from the same Generator: placement, spatial
    transform, intensity, mirroring (only the noise field is left to the accelerator)."""
    patch = tuple(int(p) for p in data_cfg.patch)
    initial = initial_patch_size(patch, data_cfg.augment)
    voxel = choose_voxel(case, data_cfg.foreground_classes, rng) if force_foreground else None
    start = enlarged_start(case.shape, patch, initial, rng, voxel, overhang_voxels(data_cfg))
    draws = device_augment.draw(rng, data_cfg.augment, case.channels)
    lo, edges = device_augment.reach(draws, patch, initial, case.channels)
    _label(case)  # a case without labels cannot be a training case
    image, label, norm = case.stored_box(start + lo, start + lo + edges, data_cfg.device_crop_dtype)
    return {"image": image.reshape(-1, case.channels), "label": label.reshape(-1),
            "box": np.concatenate([lo, edges]).astype(np.int32), "norm": norm, "augment": draws}


def outside_fraction(shape, matrix, centre, patch, step: int = 1) -> float:
    """Share of a `patch`-sized output's voxels whose source point (see augment.resample) lies
    outside a case of `shape` (outside [0, n - 1] on some axis): the voxels that read 0 because
    there is no data there. step > 1 counts every step-th voxel along each axis only."""
    patch = tuple(int(p) for p in patch)
    to_source = source_points(matrix, centre, patch)
    axes = [np.arange(0, p, step) for p in patch]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    points = to_source(grid)
    upper = np.asarray(shape, np.float64) - 1
    inside = np.all((points >= 0) & (points <= upper), axis=1)
    return float(1.0 - inside.mean())


def _label(case: Case) -> np.ndarray:
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label map: it cannot be a training case")
    return case.label
