"""Segmentation metrics with BraTS conventions."""
from __future__ import annotations

import numpy as np

from segguided_jax.data.brats import REGIONS


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks. BraTS convention: both empty -> 1.0; one empty -> 0.0."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def region_dice(pred_regions: np.ndarray, ref_regions: np.ndarray) -> dict:
    """Per-region Dice of (..., 3) boolean masks in REGIONS order: {"dice_et", "dice_tc", "dice_wt"}."""
    return {f"dice_{r.lower()}": dice(pred_regions[..., i], ref_regions[..., i]) for i, r in enumerate(REGIONS)}
