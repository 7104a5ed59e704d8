"""Segmentation metrics with BraTS conventions: pure numpy, usable from training code.

Every function takes boolean masks (or label maps) as numpy arrays on one voxel grid, and, where a
distance is involved, the voxel spacing in mm in the same axis order as the array (for a NIfTI file:
``img.header.get_zooms()[:3]``). Each number below says which definition it uses.

Classic metrics (BraTS 2021; the BraTS 2023 code reports them as "Legacy_*"), per region ET, TC, WT
    dice          2|P∩R| / (|P|+|R|). Both empty: 1. One empty: 0.
    hd95          95th-percentile Hausdorff distance in mm. Two definitions, chosen by ``method``:
                  "brats" (default): as the official BraTS 2023 code computes it (its
                  ``Legacy_HD95`` and lesion-wise HD95 call DeepMind's ``surface_distance``
                  ``compute_surface_distances`` and ``compute_robust_hausdorff(..., 95)``). The
                  surface elements of a mask are the voxel corners whose 2 x 2 x 2 voxel
                  neighbourhood is partly inside the mask (voxels outside the array count as
                  background); each is weighted by the area in mm^2 of the marching-cubes surface
                  in that neighbourhood (DeepMind's table, scaled by the spacing). For each
                  surface element of P the Euclidean distance in mm to the nearest surface element
                  of R (``distance_transform_edt`` with ``sampling=spacing``), and the same from R
                  to P. Per direction, the distances sorted ascending with their areas: the first
                  distance at which the cumulative area reaches 95 % of the total (no
                  interpolation). HD95 is the larger of the two directed values.
                  "medpy" (``medpy.metric.binary.hd95``): the surface of a mask is the mask minus
                  its erosion by the 6-connected cross; the distances from every surface voxel of P
                  to the nearest surface voxel of R and from R to P are pooled, unweighted, and
                  HD95 is their ``numpy.percentile`` at 95 (linear interpolation).
                  The two agree on smooth surfaces near each other, not in general: pooling lets a
                  far part of one mask's surface be outvoted by the rest of both surfaces, while the
                  official value takes the worse direction. When 5-10 % of the surface lies far
                  away (a false-positive blob, a missed lobe) they can differ by 20 mm or more (a
                  blob with 5.3 % of the pooled area in tests/test_metrics.py: 25.1 vs 4.4 mm).
                  Both empty: 0. Exactly one empty: a penalty instead of the infinite distance,
                  ``HD95_EMPTY`` = 374 mm in the official BraTS 2023 code (legacy and lesion-wise
                  HD95 alike; the diagonal of the 240 x 240 x 155 BraTS volume at 1 mm is 373.13 mm,
                  rounded up), ``HD95_EMPTY_2021`` = 373.13 mm in the BraTS 2021 results (that
                  diagonal itself); ``volume_diagonal`` gives the diagonal of any other grid.
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
    4. Per lesion: Dice and HD95 (as ``hd95`` above, same method) between the lesion and the union
       of its matched prediction components; a lesion with no match has Dice 0 and HD95
       ``HD95_EMPTY``.
    5. Small lesions: a reference lesion whose volume (voxel count x sx x sy x sz, in mm^3; at
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
    attention_soft_dice_other   the map's largest soft Dice with another sub-region of the case
                        (NaN when no other is present): a map that explains its own sub-region
                        has a soft Dice with it well above this (the diagonal of the map x mask
                        matrix dominates).
    In case_metrics all three are NaN (left out of summaries) for a case without the sub-region: a
    map's fidelity to a sub-region is measured where the sub-region exists.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from segguided_jax.data.brats import REGIONS, SUBREGIONS, labels_to_regions

# HD95 when exactly one of the two masks is empty (the replacement for the infinite distance).
HD95_EMPTY = 374.0  # the official BraTS 2023 code, for legacy and lesion-wise HD95
HD95_EMPTY_2021 = 373.13  # BraTS 2021: the 240 x 240 x 155 volume's diagonal at 1 mm, as reported
HD95_METHODS = ("brats", "medpy")
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
    """MedPy-style directed distances: from every surface voxel of mask `a` to the nearest surface
    voxel of mask `b`, in mm (both non-empty, same shape; spacing in mm per axis). Returns a 1-D
    float64 array with one entry per surface voxel of `a`, in C order."""
    a, b, spacing = _check_pair(a, b, spacing)
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    # Distances only involve the two surfaces: crop to their joint box plus one voxel, so that the
    # erosion sees the same neighbourhood as in the full array (exact, and much faster).
    box = _bbox(a | b, pad=1)
    a, b = a[box], b[box]
    dist_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return dist_to_b[_surface(a)]


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple) -> np.ndarray:
    """(256,) float64: area in mm^2 of the surface inside a 2 x 2 x 2 block of voxels, for each of
    the 256 occupancy codes, from DeepMind's marching-cubes table (package ``surface-distance``)."""
    try:
        from surface_distance import lookup_tables
    except ImportError as e:
        raise ImportError("HD95 with method='brats' needs the package surface-distance "
                          "(pip install surface-distance), DeepMind's surface-element tables") from e
    table = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    table.flags.writeable = False
    return table


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """Occupancy code (0..255) of the 2 x 2 x 2 voxel block around every voxel corner of a 3-D mask
    that is already cropped with one background voxel past its high end on each axis. Entry [i, j, k]
    describes the corner shared by voxels [i-1:i+1, j-1:j+1, k-1:k+1] (voxels outside the array
    count as background); the bit weights are DeepMind's, so codes index their area table."""
    from surface_distance import lookup_tables

    return ndimage.correlate(mask.astype(np.uint8), lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL,
                             mode="constant", cval=0)


def surfel_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict:
    """Surface elements of two non-empty 3-D boolean masks and their distances to the other surface,
    as the official BraTS 2023 code computes them (DeepMind's ``compute_surface_distances``).

    Every voxel corner whose 2 x 2 x 2 neighbourhood is neither all inside nor all outside a mask is
    a surface element ("surfel") of that mask, weighted by the area in mm^2 of the marching-cubes
    surface inside that neighbourhood (which depends on the spacing). Its distance to the other mask
    is the Euclidean distance in mm to the nearest surfel corner of the other mask.
    Returns {"pred_to_ref", "pred_areas", "ref_to_pred", "ref_areas"}: 1-D float64 arrays, each
    direction sorted by (distance, area)."""
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    if pred.ndim != 3:
        raise ValueError(f"surfel distances need 3-D masks, got shape {pred.shape}")
    if not pred.any() or not ref.any():
        raise ValueError("surfel_distances needs two non-empty masks")
    # The joint bounding box plus one voxel past its high end holds every corner touching either
    # mask (the low side's corners come from the correlation's zero border): exact, and fast.
    box = _bbox(pred | ref, pad=0)
    grid = tuple(s.stop - s.start + 1 for s in box)
    table = _surfel_area_table(tuple(float(s) for s in spacing))
    out = {}
    corners = {}
    for name, mask in (("pred", pred), ("ref", ref)):
        cropped = np.zeros(grid, bool)
        cropped[tuple(slice(0, n - 1) for n in grid)] = mask[box]
        codes = _corner_codes(cropped)
        border = (codes != 0) & (codes != 255)
        corners[name] = (border, table[codes[border]])
    for a, b in (("pred", "ref"), ("ref", "pred")):
        border_a, areas = corners[a]
        distances = ndimage.distance_transform_edt(~corners[b][0], sampling=spacing)[border_a]
        order = np.lexsort((areas, distances))  # = DeepMind's sorted(zip(distances, areas))
        out[f"{a}_to_{b}"], out[f"{a}_areas"] = distances[order], areas[order]
    return out


def weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float = 95.0) -> float:
    """The area-weighted percentile of DeepMind's ``compute_robust_hausdorff`` for one direction:
    distances sorted ascending (1-D float), areas their weights; the first distance at which the
    cumulative area share reaches percent / 100 (no interpolation)."""
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[min(index, len(distances) - 1)])


def _hd95_medpy(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> float:
    box = _bbox(pred | ref, pad=1)  # as in surface_distances, but cropped and eroded once
    pred_surface, ref_surface = _surface(pred[box]), _surface(ref[box])
    distances = np.concatenate([
        ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface],
        ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]])
    return float(np.percentile(distances, 95))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
         empty_penalty: float = HD95_EMPTY, method: str = "brats") -> float:
    """95th-percentile Hausdorff distance in mm between two boolean masks (definitions in the module
    docstring). pred, ref: same-shape boolean arrays (3-D for method "brats"); spacing: voxel size
    in mm per axis; method: "brats" (the official BraTS 2023 code's, default) or "medpy".
    Both empty -> 0.0; exactly one empty -> `empty_penalty` (BraTS 2023: 374)."""
    if method not in HD95_METHODS:
        raise ValueError(f"HD95 method must be one of {HD95_METHODS}, got {method!r}")
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return float(empty_penalty)
    if method == "medpy":
        return _hd95_medpy(pred, ref, spacing)
    s = surfel_distances(pred, ref, spacing)
    return max(weighted_percentile(s["ref_to_pred"], s["ref_areas"]),
               weighted_percentile(s["pred_to_ref"], s["pred_areas"]))


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
                empty_penalty: float = HD95_EMPTY, method: str = "brats") -> dict:
    """BraTS 2023 lesion-wise Dice and HD95 of two 3-D boolean masks (rules in the module docstring).

    pred, ref: same-shape boolean arrays (X, Y, Z); spacing: voxel size in mm per axis; method: the
    per-lesion HD95 definition (see ``hd95``).
    Returns {"dice", "hd95" (mm), "num_tp", "num_fn", "num_fp",
             "lesions": one dict per reference lesion {"volume_mm3", "dice", "hd95", "matched"
             (number of matched prediction components), "counted" (volume > min_volume_mm3)}}.
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    if pred.ndim != 3:
        raise ValueError(f"lesion_wise needs 3-D masks, got shape {pred.shape}")
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
            lesion_hd = hd95(joint_pred, joint_lesion, spacing, empty_penalty, method)
        else:
            lesion_dice, lesion_hd = 0.0, float(empty_penalty)
        volume = float(size * spacing[0] * spacing[1] * spacing[2])  # the official code's order
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
                 min_volume_mm3: float = LESION_MIN_VOLUME_MM3, hd95_method: str = "brats",
                 lesion_empty_penalty: float | None = None) -> dict:
    """All BraTS metrics of one case, as a flat {name: number} dict.

    pred_labels, ref_labels: internal labels (X, Y, Z), 0 bg, 1 NCR, 2 ED, 3 ET; spacing in mm.
    attention: optional {sub-region name in SUBREGIONS: map (X, Y, Z) in [0, 1]}; any subset.
    empty_penalty: the classic HD95 when exactly one mask is empty; lesion_empty_penalty: the
    lesion-wise one (None: the same). hd95_method: "brats" or "medpy", for both (see ``hd95``).
    Defaults reproduce the official BraTS 2023 code.
    Keys, for r in et/tc/wt: dice_r, hd95_r, sensitivity_r, specificity_r, lesion_dice_r,
    lesion_hd95_r, lesion_tp_r, lesion_fn_r, lesion_fp_r; for s in ncr/ed/et with a map:
    attention_soft_dice_s, attention_mass_inside_s, attention_soft_dice_other_s.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}")
    pred_regions, ref_regions = labels_to_regions(pred_labels), labels_to_regions(ref_labels)
    lesion_penalty = empty_penalty if lesion_empty_penalty is None else lesion_empty_penalty
    out = {}
    for i, region in enumerate(REGIONS):
        p, r, name = pred_regions[..., i], ref_regions[..., i], region.lower()
        out[f"dice_{name}"] = dice(p, r)
        out[f"hd95_{name}"] = hd95(p, r, spacing, empty_penalty, hd95_method)
        out[f"sensitivity_{name}"] = sensitivity(p, r)
        out[f"specificity_{name}"] = specificity(p, r)
        lw = lesion_wise(p, r, spacing, dilation_iterations, min_volume_mm3, lesion_penalty, hd95_method)
        out[f"lesion_dice_{name}"] = lw["dice"]
        out[f"lesion_hd95_{name}"] = lw["hd95"]
        for count in ("tp", "fn", "fp"):
            out[f"lesion_{count}_{name}"] = lw[f"num_{count}"]
    if attention is not None:
        # Each sub-region's mask once: a map is scored against its own and every other present one.
        masks = {label: ref_labels == label for label in range(1, len(SUBREGIONS) + 1)}
        present = {label: bool(mask.any()) for label, mask in masks.items()}
    for label, sub in enumerate(SUBREGIONS, start=1):
        if attention is not None and sub in attention:
            mask, name = masks[label], sub.lower()
            out[f"attention_soft_dice_{name}"] = soft_dice(attention[sub], mask) if present[label] else float("nan")
            out[f"attention_mass_inside_{name}"] = (attention_mass_inside(attention[sub], mask) if present[label]
                                                    else float("nan"))
            others = [soft_dice(attention[sub], masks[other]) for other in masks if other != label and present[other]]
            out[f"attention_soft_dice_other_{name}"] = (max(others) if present[label] and others
                                                        else float("nan"))
    return out
