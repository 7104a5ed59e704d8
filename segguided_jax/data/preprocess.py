"""Preprocessing of one case (crop to the brain, resample, z-score) and its exact inverse.

Conversion and prediction both call `preprocess`, so the network sees the same input whichever way a
case arrives; `to_original_grid` takes anything computed on the preprocessed grid back to the case's
own grid.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from segguided_jax.data.brats import ALL_EDITIONS, MODALITIES, Edition
from segguided_jax.data.cases import LoadedCase


def preprocess(case: LoadedCase, target_spacing=None):
    """Crop to the brain's box, optionally resample to target_spacing (mm), z-score inside the brain.

    Returns (image (x, y, z, 4) float32, labels (x, y, z) uint8 or None, meta) where meta holds
    orig_shape, crop_box [[lo, hi)] * 3, the normalisation statistics and the preprocessed shape."""
    brain = np.any(case.images != 0, axis=-1)  # load_case has checked it is not empty
    nz = np.argwhere(brain)
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    images = case.images[box]
    labels = None if case.labels is None else case.labels[box]
    brain = brain[box]
    if target_spacing is not None and not np.allclose(case.spacing, target_spacing, rtol=1e-3):
        zoom = [s / t for s, t in zip(case.spacing, target_spacing)]
        shape = [max(1, int(round(n * z))) for n, z in zip(brain.shape, zoom)]
        factors = [n / m for n, m in zip(shape, brain.shape)]
        images = np.stack([ndimage.zoom(images[..., m], factors, order=3, mode="nearest", grid_mode=True)
                           for m in range(images.shape[-1])], axis=-1)
        brain = ndimage.zoom(brain.astype(np.uint8), factors, order=0, mode="nearest", grid_mode=True) > 0
        if labels is not None:
            labels = ndimage.zoom(labels, factors, order=0, mode="nearest", grid_mode=True)
    out = np.zeros(brain.shape + (len(MODALITIES),), np.float32)
    stats = {}
    for m, modality in enumerate(MODALITIES):
        vals = images[..., m][brain].astype(np.float64)
        mean, std = float(vals.mean()), float(vals.std())
        out[..., m] = np.where(brain, (images[..., m] - mean) / max(std, 1e-8), 0)
        stats[modality] = [mean, std]
    meta = {"orig_shape": list(case.images.shape[:3]), "crop_box": [[int(a), int(b)] for a, b in zip(lo, hi)],
            "shape": list(out.shape[:3]), "norm": stats}
    return out, labels, meta


def to_original_grid(values: np.ndarray, meta: dict) -> np.ndarray:
    """Values (x, y, z[, C]) on a case's preprocessed grid -> (X, Y, Z[, C]) on its original grid,
    zeros outside the crop box. Integer values (labels) keep their dtype and go back by nearest
    neighbour if the conversion resampled; float values (maps in [0, 1]) by linear interpolation,
    clipped to [0, 1], as float32. `meta` is the case's manifest entry (or preprocess's meta)."""
    if tuple(values.shape[:3]) != tuple(meta["shape"]):
        raise ValueError(f"case {meta.get('id', '?')}: values of shape {values.shape[:3]}, expected "
                         f"{tuple(meta['shape'])}")
    is_labels = values.dtype.kind in "uib"
    box = tuple(slice(lo, hi) for lo, hi in meta["crop_box"])
    out = np.zeros(tuple(meta["orig_shape"]) + values.shape[3:], values.dtype if is_labels else np.float32)
    crop_shape = out[box].shape[:3]
    if values.shape[:3] != crop_shape:
        factors = [c / s for c, s in zip(crop_shape, values.shape[:3])] + [1] * (values.ndim - 3)
        values = ndimage.zoom(values, factors, order=0 if is_labels else 1, mode="nearest", grid_mode=True)
    out[box] = values if is_labels else np.clip(values, 0.0, 1.0)
    return out


def labels_to_original(labels: np.ndarray, meta: dict, edition: str | Edition) -> np.ndarray:
    """Internal labels on the preprocessed grid -> the edition's label values (uint8) on the
    original grid: the exact inverse of the conversion's crop and label map. `edition`: a key of
    ALL_EDITIONS or an Edition (an nnU-Net dataset's)."""
    edition = ALL_EDITIONS[edition] if isinstance(edition, str) else edition
    return edition.from_internal(to_original_grid(np.asarray(labels, np.uint8), meta))
