"""Segmentation metrics with BraTS conventions: pure numpy, usable from training code.

Every function takes boolean masks (or label maps) as numpy arrays on one voxel grid, and, where a
distance is involved, the voxel spacing in mm in the same axis order as the array (for a NIfTI file:
``img.header.get_zooms()[:3]``). Each number below says which definition it uses.

Classic (BraTS 2021) metrics, per region ET, TC, WT
    dice          2|P∩R| / (|P|+|R|). Both empty: 1. One empty: 0.
    hd95          Symmetric 95th-percentile Hausdorff distance in mm, MedPy-style
                  (``medpy.metric.binary.hd95``): the surface of a mask is the mask minus its
                  erosion by the 6-connected cross (erosion treats voxels outside the array as
                  background, so a mask touching the array edge has surface there); for every
                  surface voxel of P the Euclidean distance in mm to the nearest surface voxel of R
                  (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``, so
                  anisotropic voxels are handled), and the same from R to P; HD95 is
                  ``numpy.percentile`` (linear interpolation) at 95 of the two lists pooled.
                  Both empty: 0. One empty: ``HD95_EMPTY`` = 374 mm, the constant the BraTS
                  evaluation substitutes for the infinite distance (it is the diagonal of the BraTS
                  volume, 240 x 240 x 155 at 1 mm = 373.1 mm, rounded up); ``volume_diagonal``
                  gives the diagonal of any other grid, for callers who prefer it.
                  Note: the official BraTS 2023 code computes HD95 with DeepMind's
                  ``surface_distance`` package instead (surface elements at voxel corners weighted
                  by their area, the larger of the two directed 95th percentiles), which can differ
                  from this definition by a fraction of a voxel; the penalties are identical.
    sensitivity   TP / (TP + FN); the reference empty: 1 if the prediction is empty too, else 0.
    specificity   TN / (TN + FP); 0 when the reference has no background (as the official code's
                  epsilon-guarded formula gives).
                  Both as in the BraTS 2023 code's ``get_sensitivity_and_specificity`` (from GaNDLF).

Lesion-wise (BraTS 2023) Dice and HD95, ``lesion_wise``
    Source followed: the official BraTS 2023 lesion-wise evaluation, github.com/rachitsaluja/
    BraTS-2023-Metrics, files ``eval.py`` (``get_LesionWiseScores``, ``get_LesionWiseResults``;
    read at commit 0e272e69) and its packaged copy
    ``brats_2023_metrics/surface_distance/brats_metrics.py`` (``get_lesion_wise_score``,
    ``get_lesion_wise_results``; commit 0c603fcc); parameters for BraTS-GLI. The rules:
    1. Components: 26-connected components of the prediction mask P and of the reference mask R.
    2. Merging of reference lesions: R is dilated ``dilation_iterations`` = 3 times with the
       18-connected structure (``generate_binary_structure(3, 2)``); the 26-connected components
       of the dilated mask define the lesions, and each lesion is the set of original R voxels
       inside one such component (the reference itself is not changed, only grouped).
    3. Matching: each reference lesion is dilated again the same way (3 x 18-connected); every
       prediction component that touches the dilated lesion is matched to it (a component may match
       several lesions).
    4. Per lesion: Dice and HD95 (as ``hd95`` above) between the lesion and the union of its
       matched prediction components; a lesion with no match has Dice 0 and HD95 ``HD95_EMPTY``.
    5. Small lesions: a reference lesion whose volume (voxel count x voxel volume, in mm^3; at
       BraTS's 1 mm voxels this is the voxel count) is <= ``min_volume_mm3`` = 50 is left out of
       the score, matched or not. Prediction components matched only to such lesions are not false
       positives either.
    6. False positives: prediction components matched to no reference lesion (of any size; no size
       threshold applies to them) each count as a lesion with Dice 0 and HD95 ``HD95_EMPTY``.
    7. Score: lesion-wise Dice = (sum of kept lesions' Dice) / (kept lesions + false positives);
       lesion-wise HD95 = (sum of kept lesions' HD95 + HD95_EMPTY x false positives) / (same).
       Nothing to score (no kept lesion and no false positive): Dice 1, HD95 0.
    Counts reported as in the official code: TP = kept lesions with a match, FN = kept lesions
    without, FP = unmatched prediction components.

Attention maps (per sub-region NCR, ED, ET, a map m in [0, 1] against the sub-region mask g)
    soft_dice           2 sum(m g) / (sum(m) + sum(g)); both zero: 1.
    attention_mass_inside   sum(m g) / sum(m): the fraction of the map's mass inside the mask;
                        NaN when the map has no mass (undefined).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from segguided_jax.data.brats import REGIONS, SUBREGIONS, labels_to_regions

# BraTS's HD95 when exactly one of the two masks is empty (their replacement for infinity).
HD95_EMPTY = 374.0
# BraTS 2023 GLI lesion-wise parameters (official code: dilation_factor, lesion_volume_thresh).
LESION_DILATION = 3
LESION_MIN_VOLUME_MM3 = 50.0

_CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
_DILATION_18 = ndimage.generate_binary_structure(3, 2)


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


def _check_pair(pred, ref, spacing=None):
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if spacing is None:
        return pred, ref, None
    spacing = np.asarray(spacing, np.float64).reshape(-1)
    if spacing.shape != (pred.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers (mm), got {spacing.tolist()}")
    return pred, ref, spacing


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a grid of `shape` voxels of size `spacing` (mm): the largest
    distance two points in the volume can have. 240 x 240 x 155 at 1 mm -> 373.1."""
    return float(np.sqrt(np.sum((np.asarray(shape, np.float64) * np.asarray(spacing, np.float64)) ** 2)))


def _bbox(mask: np.ndarray, pad: int) -> tuple:
    """Slices of the bounding box of a non-empty mask, grown by `pad` voxels, clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(nz[0]) - pad, 0), min(int(nz[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion by the 6-connected cross (MedPy's border)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances in mm from every surface voxel of mask `a` to the nearest surface voxel of mask
    `b` (both non-empty, same shape; spacing in mm per axis). Returns a 1-D float64 array with one
    entry per surface voxel of `a`, in C order."""
    a, b, spacing = _check_pair(a, b, spacing)
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    # Distances only involve the two surfaces: crop to their joint box plus one voxel, so that the
    # erosion sees the same neighbourhood as in the full array (exact, and much faster).
    box = _bbox(a | b, pad=1)
    a, b = a[box], b[box]
    dist_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return dist_to_b[_surface(a)]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
         empty_penalty: float = HD95_EMPTY) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks (MedPy-style,
    see the module docstring). pred, ref: same-shape boolean arrays; spacing: voxel size in mm per
    axis. Both empty -> 0.0; exactly one empty -> `empty_penalty` (BraTS: 374)."""
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return float(empty_penalty)
    box = _bbox(pred | ref, pad=1)  # as in surface_distances, but cropped and eroded once
    pred_surface, ref_surface = _surface(pred[box]), _surface(ref[box])
    distances = np.concatenate([
        ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface],
        ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]])
    return float(np.percentile(distances, 95))


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP / (TP + FN) of two boolean masks. Reference empty: 1.0 if the prediction is empty too,
    else 0.0 (the BraTS 2023 code's convention)."""
    pred, ref, _ = _check_pair(pred, ref)
    positives = int(ref.sum())
    if positives == 0:
        return 1.0 if not pred.any() else 0.0
    return int(np.logical_and(pred, ref).sum()) / positives


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """TN / (TN + FP) of two boolean masks; 0.0 when the reference has no background voxel."""
    pred, ref, _ = _check_pair(pred, ref)
    negatives = int(ref.size - ref.sum())
    if negatives == 0:
        return 0.0
    return int(np.logical_and(~pred, ~ref).sum()) / negatives


def lesion_wise(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                dilation_iterations: int = LESION_DILATION, min_volume_mm3: float = LESION_MIN_VOLUME_MM3,
                empty_penalty: float = HD95_EMPTY) -> dict:
    """BraTS 2023 lesion-wise Dice and HD95 of two 3-D boolean masks (rules in the module docstring).

    pred, ref: same-shape boolean arrays (X, Y, Z); spacing: voxel size in mm per axis.
    Returns {"dice", "hd95" (mm), "num_tp", "num_fn", "num_fp",
             "lesions": one dict per reference lesion {"volume_mm3", "dice", "hd95", "matched"
             (number of matched prediction components), "counted" (volume > min_volume_mm3)}}.
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    if pred.ndim != 3:
        raise ValueError(f"lesion_wise needs 3-D masks, got shape {pred.shape}")
    voxel_volume = float(np.prod(spacing))
    if pred.any() or ref.any():
        # Nothing happens farther than the dilation reach from either mask: crop (exact, faster).
        box = _bbox(pred | ref, pad=dilation_iterations + 1)
        pred, ref = pred[box], ref[box]
    pred_cc, num_pred = ndimage.label(pred, structure=_CONNECTIVITY_26)
    pred_boxes = ndimage.find_objects(pred_cc)
    # Lesions: reference voxels grouped by the 26-connected components of the dilated reference.
    if ref.any():
        dilated = ndimage.binary_dilation(ref, structure=_DILATION_18, iterations=dilation_iterations)
        dilated_cc, num_lesions = ndimage.label(dilated, structure=_CONNECTIVITY_26)
        lesion_cc = np.where(ref, dilated_cc, 0)
    else:
        num_lesions, lesion_cc = 0, np.zeros(ref.shape, np.int32)
    lesion_boxes = ndimage.find_objects(lesion_cc)

    lesions, matched_any = [], set()
    for lesion_id in range(1, num_lesions + 1):
        # Work inside the lesion's box grown by the dilation reach (exact: dilation cannot leave it).
        box = _grow(lesion_boxes[lesion_id - 1], dilation_iterations + 1, ref.shape)
        lesion = lesion_cc[box] == lesion_id
        reach = ndimage.binary_dilation(lesion, structure=_DILATION_18, iterations=dilation_iterations)
        matched = np.unique(pred_cc[box][reach])
        matched = matched[matched != 0]
        matched_any.update(int(m) for m in matched)
        size = int(lesion.sum())
        if len(matched):
            # Dice and HD95 on the joint box of the lesion and all its matched components.
            joint = _union_box([lesion_boxes[lesion_id - 1]] + [pred_boxes[m - 1] for m in matched])
            joint_lesion = lesion_cc[joint] == lesion_id
            joint_pred = np.isin(pred_cc[joint], matched)
            lesion_dice = dice(joint_pred, joint_lesion)
            lesion_hd = hd95(joint_pred, joint_lesion, spacing, empty_penalty)
        else:
            lesion_dice, lesion_hd = 0.0, float(empty_penalty)
        volume = size * voxel_volume
        lesions.append({"volume_mm3": volume, "dice": lesion_dice, "hd95": lesion_hd,
                        "matched": int(len(matched)), "counted": volume > min_volume_mm3})

    kept = [les for les in lesions if les["counted"]]
    num_fp = num_pred - len(matched_any)
    denominator = len(kept) + num_fp
    if denominator == 0:
        score_dice, score_hd = 1.0, 0.0
    else:
        score_dice = sum(les["dice"] for les in kept) / denominator
        score_hd = (sum(les["hd95"] for les in kept) + num_fp * float(empty_penalty)) / denominator
    return {"dice": float(score_dice), "hd95": float(score_hd),
            "num_tp": sum(1 for les in kept if les["matched"]),
            "num_fn": sum(1 for les in kept if not les["matched"]),
            "num_fp": int(num_fp), "lesions": lesions}


def _grow(box: tuple, pad: int, shape: Sequence[int]) -> tuple:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _union_box(boxes: list) -> tuple:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def soft_dice(prob: np.ndarray, mask: np.ndarray) -> float:
    """Soft Dice 2 sum(p m) / (sum(p) + sum(m)) of a map p in [0, 1] and a boolean mask m of the
    same shape (float64 sums). Both all-zero -> 1.0."""
    prob = np.asarray(prob, np.float64)
    mask = np.asarray(mask, bool)
    if prob.shape != mask.shape:
        raise ValueError(f"map shape {prob.shape} != mask shape {mask.shape}")
    total = prob.sum() + mask.sum()
    if total == 0:
        return 1.0
    return float(2.0 * prob[mask].sum() / total)


def attention_mass_inside(prob: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of a non-negative map's mass inside a boolean mask: sum(p m) / sum(p), in [0, 1].
    NaN when the map has no mass."""
    prob = np.asarray(prob, np.float64)
    mask = np.asarray(mask, bool)
    if prob.shape != mask.shape:
        raise ValueError(f"map shape {prob.shape} != mask shape {mask.shape}")
    mass = prob.sum()
    if mass == 0:
        return float("nan")
    return float(prob[mask].sum() / mass)


def case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 attention: Mapping[str, np.ndarray] | None = None, empty_penalty: float = HD95_EMPTY,
                 dilation_iterations: int = LESION_DILATION,
                 min_volume_mm3: float = LESION_MIN_VOLUME_MM3) -> dict:
    """All BraTS metrics of one case, as a flat {name: number} dict.

    pred_labels, ref_labels: internal labels (X, Y, Z), 0 bg, 1 NCR, 2 ED, 3 ET; spacing in mm.
    attention: optional {sub-region name in SUBREGIONS: map (X, Y, Z) in [0, 1]}; any subset.
    Keys, for r in et/tc/wt: dice_r, hd95_r, sensitivity_r, specificity_r, lesion_dice_r,
    lesion_hd95_r, lesion_tp_r, lesion_fn_r, lesion_fp_r; for s in ncr/ed/et with a map:
    attention_soft_dice_s, attention_mass_inside_s.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}")
    pred_regions, ref_regions = labels_to_regions(pred_labels), labels_to_regions(ref_labels)
    out = {}
    for i, region in enumerate(REGIONS):
        p, r, name = pred_regions[..., i], ref_regions[..., i], region.lower()
        out[f"dice_{name}"] = dice(p, r)
        out[f"hd95_{name}"] = hd95(p, r, spacing, empty_penalty)
        out[f"sensitivity_{name}"] = sensitivity(p, r)
        out[f"specificity_{name}"] = specificity(p, r)
        lw = lesion_wise(p, r, spacing, dilation_iterations, min_volume_mm3, empty_penalty)
        out[f"lesion_dice_{name}"] = lw["dice"]
        out[f"lesion_hd95_{name}"] = lw["hd95"]
        for count in ("tp", "fn", "fp"):
            out[f"lesion_{count}_{name}"] = lw[f"num_{count}"]
    for label, sub in enumerate(SUBREGIONS, start=1):
        if attention is not None and sub in attention:
            mask = ref_labels == label
            out[f"attention_soft_dice_{sub.lower()}"] = soft_dice(attention[sub], mask)
            out[f"attention_mass_inside_{sub.lower()}"] = attention_mass_inside(attention[sub], mask)
    return out
