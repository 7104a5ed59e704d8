"""Metrics with answers worked out by hand (see each test's comment)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from segguided_jax.evaluation import metrics

SHAPE = (32, 32, 32)


def box(*slices, shape=SHAPE):
    mask = np.zeros(shape, bool)
    mask[tuple(slices)] = True
    return mask


def test_dice_and_region_dice_unchanged():
    a, b = box(slice(0, 2), slice(0, 2), slice(0, 2)), box(slice(0, 2), slice(0, 2), slice(0, 1))
    assert metrics.dice(a, b) == pytest.approx(2 * 4 / 12)
    assert metrics.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert metrics.dice(np.ones(3, bool), np.zeros(3, bool)) == 0.0
    regions = np.stack([a, a, b], -1)
    assert metrics.region_dice(regions, regions) == {"dice_et": 1.0, "dice_tc": 1.0, "dice_wt": 1.0}


@pytest.mark.parametrize("method", metrics.HD95_METHODS)
def test_shifted_cube_anisotropic(method):
    # A 10^3 cube and the same cube shifted by k = 2 voxels along z, spacing (1, 1, 2.5) mm.
    # Dice = overlap 10*10*8 / 1000 = 0.8. Every surface point of either cube is within k voxels
    # along z (5 mm) of the other's surface, and the whole bottom (top) face is exactly 5 mm away:
    # MedPy: 100 of the 488 surface voxels (20 % > 5 %); BraTS: 100 mm^2 of about 1,200 mm^2 of
    # surface (8 % > 5 %). HD95 = 5 mm in both directions, by both definitions.
    ref = box(slice(5, 15), slice(5, 15), slice(5, 15))
    pred = box(slice(5, 15), slice(5, 15), slice(7, 17))
    assert metrics.dice(pred, ref) == pytest.approx(0.8)
    assert metrics.hd95(pred, ref, (1.0, 1.0, 2.5), method=method) == pytest.approx(5.0)
    assert metrics.surface_distances(pred, ref, (1.0, 1.0, 2.5)).max() == pytest.approx(5.0)
    assert metrics.surface_distances(pred, ref, (1.0, 1.0, 2.5)).size == 10 ** 3 - 8 ** 3
    # The spacing's axis order matters: the same shift measured with 2.5 mm along x is 2 mm.
    assert metrics.hd95(pred, ref, (2.5, 1.0, 1.0), method=method) == pytest.approx(2.0)
    # Sensitivity 800/1000; specificity: TN = 32^3 - 1200 (union), negatives = 32^3 - 1000.
    assert metrics.sensitivity(pred, ref) == pytest.approx(0.8)
    assert metrics.specificity(pred, ref) == pytest.approx((32 ** 3 - 1200) / (32 ** 3 - 1000))


@pytest.mark.parametrize("method", metrics.HD95_METHODS)
def test_single_voxels_and_robustness(method):
    # Two single voxels 3 slices apart at 2.5 mm. MedPy: every distance is 7.5 mm. BraTS: each
    # voxel's 8 corners carry equal areas, 4 of them 2 slices (5 mm) and 4 three slices (7.5 mm)
    # from the other voxel's nearest corner; 95 % of the area is reached at 7.5 mm.
    a, b = box(5, 5, 5), box(5, 5, 8)
    assert metrics.hd95(a, b, (1.0, 1.0, 2.5), method=method) == pytest.approx(7.5)
    # One stray voxel 16 voxels above the cube's top face: its distance is 1 of 1 + 2*488 pooled
    # distances (MedPy), or its 8 corners' sqrt(3) mm^2 of the prediction's ~566 mm^2 of surface
    # (BraTS): under 5 % either way, all others are 0, so HD95 is 0 while the Hausdorff distance is 16.
    ref = box(slice(5, 15), slice(5, 15), slice(5, 15))
    pred = ref | box(5, 5, 30)
    assert metrics.surface_distances(pred, ref, (1, 1, 1)).max() == 16.0
    assert metrics.hd95(pred, ref, (1, 1, 1), method=method) == 0.0


def test_empty_conventions():
    empty, full = np.zeros(SHAPE, bool), box(slice(2, 6), slice(2, 6), slice(2, 6))
    assert metrics.dice(empty, empty) == 1.0 and metrics.hd95(empty, empty) == 0.0
    assert metrics.sensitivity(empty, empty) == 1.0 and metrics.specificity(empty, empty) == 1.0
    lw = metrics.lesion_wise(empty, empty)
    assert (lw["dice"], lw["hd95"], lw["num_tp"], lw["num_fn"], lw["num_fp"]) == (1.0, 0.0, 0, 0, 0)
    for pred, ref in ((full, empty), (empty, full)):
        assert metrics.dice(pred, ref) == 0.0
        assert metrics.hd95(pred, ref, (1, 1, 2.5)) == metrics.HD95_EMPTY == 374.0
        assert metrics.sensitivity(pred, ref) == 0.0
        lw = metrics.lesion_wise(pred, ref)
        assert (lw["dice"], lw["hd95"]) == (0.0, 374.0)
        assert (lw["num_fp"], lw["num_fn"]) == ((1, 0) if pred.any() else (0, 1))
    # BraTS 2023's 374 is the 1 mm BraTS volume's diagonal, 373.13, rounded up; BraTS 2021's is
    # that diagonal to two decimals.
    diagonal = metrics.volume_diagonal((240, 240, 155), (1, 1, 1))
    assert math.ceil(diagonal) == 374 and metrics.HD95_EMPTY_2021 == round(diagonal, 2) == 373.13
    for method in metrics.HD95_METHODS:
        assert metrics.hd95(full, empty, method=method) == 374.0
        assert metrics.hd95(empty, empty, method=method) == 0.0
    assert metrics.hd95(full, empty, empty_penalty=diagonal) == pytest.approx(diagonal)


def test_lesion_wise_one_lesion_missed():
    # Two 4^3 lesions (64 voxels > 50) far apart; the prediction finds only the first, shifted by
    # one voxel: that lesion's Dice = 2*48/128 = 0.75 and HD95 = 1 mm; the missed one scores 0 and
    # 374. Lesion-wise: Dice (0.75 + 0) / 2, HD95 (1 + 374) / 2.
    first, second = box(slice(2, 6), slice(2, 6), slice(2, 6)), box(slice(20, 24), slice(20, 24), slice(20, 24))
    ref = first | second
    pred = box(slice(3, 7), slice(2, 6), slice(2, 6))
    lw = metrics.lesion_wise(pred, ref)
    assert lw["dice"] == pytest.approx(0.375)
    assert lw["hd95"] == pytest.approx(187.5)
    assert (lw["num_tp"], lw["num_fn"], lw["num_fp"]) == (1, 1, 0)
    assert [les["dice"] for les in lw["lesions"]] == pytest.approx([0.75, 0.0])
    # The classic Dice of the same pair: 2*48 / (64 + 128).
    assert metrics.dice(pred, ref) == pytest.approx(0.5)
    # An exact first lesion: (1 + 0) / 2 and (0 + 374) / 2.
    lw = metrics.lesion_wise(first, ref)
    assert (lw["dice"], lw["hd95"]) == (pytest.approx(0.5), pytest.approx(187.0))


@pytest.mark.parametrize("extra, counted", [(0, False), (1, True)])
def test_lesion_wise_small_lesion_rule(extra, counted):
    # A found 4^3 lesion plus a missed lesion of 50 voxels (5x5x2; ignored: <= 50) or 51 voxels
    # (one voxel more; counted: Dice (1 + 0) / 2, HD95 (0 + 374) / 2).
    big = box(slice(2, 6), slice(2, 6), slice(2, 6))
    small = box(slice(20, 25), slice(20, 25), slice(20, 22))
    if extra:
        small[20, 20, 22] = True
    assert small.sum() == 50 + extra
    lw = metrics.lesion_wise(big, big | small)
    assert [les["counted"] for les in lw["lesions"]] == [True, counted]
    if counted:
        assert (lw["dice"], lw["hd95"], lw["num_fn"]) == (0.5, 187.0, 1)
    else:
        assert (lw["dice"], lw["hd95"], lw["num_fn"]) == (1.0, 0.0, 0)
    # A prediction of only the small lesion: matched, so not a false positive.
    lw = metrics.lesion_wise(small, big | small)
    assert lw["num_fp"] == 0 and lw["num_fn"] == 1


def test_lesion_wise_threshold_is_in_mm3():
    # As in the official code, the threshold is a volume: 30 voxels of 1 x 1 x 2 mm = 60 mm^3 > 50.
    big = box(slice(2, 6), slice(2, 6), slice(2, 6))
    small = box(slice(20, 25), slice(20, 26), slice(20, 21))
    lw = metrics.lesion_wise(big, big | small, spacing=(1.0, 1.0, 2.0))
    assert lw["lesions"][1]["volume_mm3"] == 60.0 and lw["lesions"][1]["counted"]
    assert lw["dice"] == 0.5


def test_lesion_wise_merging_matching_and_false_positives():
    a, b = box(slice(2, 6), slice(2, 6), slice(2, 6)), box(slice(8, 12), slice(2, 6), slice(2, 6))
    # A 2-voxel gap is bridged by the 3-fold dilation: one lesion of 128 voxels. Predicting only
    # its first half gives Dice 2*64/(64+128).
    lw = metrics.lesion_wise(a, a | b)
    assert len(lw["lesions"]) == 1
    assert lw["dice"] == pytest.approx(2 / 3) and lw["num_tp"] == 1
    # A prediction 2 voxels away from the lesion touches its dilation: matched (TP, Dice 0), no FP.
    lw = metrics.lesion_wise(b, a)
    assert (lw["num_tp"], lw["num_fn"], lw["num_fp"], lw["dice"]) == (1, 0, 0, 0.0)
    # A far-away predicted voxel is a false positive: Dice (1 + 0) / 2, HD95 (0 + 374) / 2.
    lw = metrics.lesion_wise(a | box(25, 25, 25), a)
    assert (lw["num_tp"], lw["num_fp"], lw["dice"], lw["hd95"]) == (1, 1, 0.5, 187.0)


def test_attention_scores():
    # Mask: 8 voxels. Map: 0.5 on the mask (mass 4) and 0.25 on 8 voxels outside (mass 2).
    # Soft Dice = 2*4 / (6 + 8) = 4/7; mass inside = 4/6.
    mask = box(slice(0, 2), slice(0, 2), slice(0, 2), shape=(8, 8, 8))
    prob = np.where(mask, 0.5, 0.0)
    prob[4:6, 4:6, 4:6] = 0.25
    assert metrics.soft_dice(prob, mask) == pytest.approx(4 / 7)
    assert metrics.attention_mass_inside(prob, mask) == pytest.approx(2 / 3)
    assert metrics.soft_dice(mask.astype(float), mask) == 1.0
    zero = np.zeros((8, 8, 8))
    assert metrics.soft_dice(zero, zero > 0) == 1.0
    assert math.isnan(metrics.attention_mass_inside(zero, mask))


def test_case_metrics_regions_and_keys():
    # Internal labels: ED shell, NCR core, ET block; a perfect prediction scores 1 / 0 everywhere.
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[2:12, 2:12, 2:12] = 2
    labels[4:10, 4:10, 4:10] = 3
    labels[5:8, 5:8, 5:8] = 1
    out = metrics.case_metrics(labels, labels, (1, 1, 1), attention={"ET": (labels == 3) * 0.5})
    for r in ("et", "tc", "wt"):
        assert out[f"dice_{r}"] == 1.0 and out[f"hd95_{r}"] == 0.0 and out[f"lesion_dice_{r}"] == 1.0
    assert out["attention_soft_dice_et"] == pytest.approx(2 / 3)
    assert out["attention_mass_inside_et"] == 1.0
    assert "attention_soft_dice_ncr" not in out
    assert out["attention_soft_dice_other_et"] == 0.0  # no mass on NCR or ED
    # An ET map over the whole core (189 ET + 27 NCR voxels): soft Dice 2·189/(216 + 189) with ET,
    # 2·27/(216 + 27) with NCR (the largest other), 0 with ED.
    core = np.isin(labels, (1, 3)).astype(float)
    out = metrics.case_metrics(labels, labels, (1, 1, 1), attention={"ET": core})
    assert out["attention_soft_dice_et"] == pytest.approx(378 / 405)
    assert out["attention_soft_dice_other_et"] == pytest.approx(54 / 243)
    # A map for a sub-region the case lacks has no fidelity to score: NaN, left out of summaries.
    no_et = np.where(labels == 3, 1, labels)
    out = metrics.case_metrics(no_et, no_et, (1, 1, 1), attention={"ET": np.full(labels.shape, 0.1)})
    assert math.isnan(out["attention_soft_dice_et"]) and math.isnan(out["attention_mass_inside_et"])
    assert math.isnan(out["attention_soft_dice_other_et"])
    # Predicting ET as NCR: ET empty in the prediction (Dice 0, HD95 374); TC and WT unchanged.
    out = metrics.case_metrics(np.where(labels == 3, 1, labels), labels)
    assert (out["dice_et"], out["hd95_et"], out["dice_tc"], out["dice_wt"]) == (0.0, 374.0, 1.0, 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        metrics.hd95(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1, 1))


# --- HD95 as the official BraTS 2023 code computes it (DeepMind's surface elements) ---------------

def box_surfels(lo, hi, spacing):
    """Surface elements of the box of voxels [lo, hi) (per axis), derived by hand: {corner: area mm^2}.

    A surface element sits at every voxel corner c (integer coordinates, lo <= c <= hi) whose
    2 x 2 x 2 neighbourhood is partly inside. Marching cubes runs the surface through the midpoints
    of the corner's 6 half-edges, so with s = spacing: on a face (one axis a at lo or hi; 4 voxels
    inside) a flat rectangle of the face's area, the product of the other two s; on an edge (two
    axes at a bound; 2 voxels inside) a strip of length s_e along the edge's axis e and width half the
    diagonal of the other two s; at a vertex (1 voxel inside) the triangle through the three
    half-edge midpoints, area |(s_y s_z, s_x s_z, s_x s_y)| / 8."""
    sx, sy, sz = spacing
    out = {}
    for c in np.ndindex(*(h - l + 1 for l, h in zip(lo, hi))):
        c = tuple(int(v) + l for v, l in zip(c, lo))
        at_bound = [v in (l, h) for v, l, h in zip(c, lo, hi)]
        k = sum(at_bound)
        if k == 1:
            a = at_bound.index(True)
            out[c] = float(np.prod([s for i, s in enumerate(spacing) if i != a]))
        elif k == 2:
            e = at_bound.index(False)
            others = [s for i, s in enumerate(spacing) if i != e]
            out[c] = spacing[e] * math.hypot(*others) / 2
        elif k == 3:
            out[c] = math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8
    return out


def deepmind_percentile(distances, areas, percent=95.0):
    # The rule of compute_robust_hausdorff: sort by distance, the first distance at which the
    # cumulative area share reaches percent / 100.
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(np.asarray(areas)[order]) / np.sum(areas)
    return np.asarray(distances)[order][min(np.searchsorted(cumulative, percent / 100), len(order) - 1)]


def test_weighted_percentile_rule():
    # 20 equal areas at 1..20 mm: the cumulative share reaches 0.95 exactly at the 19th (DeepMind's
    # searchsorted finds the first index where it is reached), so 19, not 20 and not interpolated.
    assert metrics.weighted_percentile(np.arange(1.0, 21.0), np.ones(20)) == 19.0
    # Weights move it: the last element holding 10 % of the area makes it the 95th percentile.
    assert metrics.weighted_percentile(np.arange(1.0, 21.0), np.r_[np.ones(19), 19 / 9]) == 20.0
    assert metrics.weighted_percentile(np.array([0.0, 7.0]), np.array([0.96, 0.04])) == 0.0


def test_surfel_areas_match_hand_geometry():
    # The surface elements and their areas of a 4 x 5 x 3 box at anisotropic spacing: exactly the
    # hand-derived corners, total area 2(ab + ac + bc) less what marching cubes cuts off at the
    # edges and vertices.
    spacing = (0.9, 1.1, 2.3)
    lo, hi = (3, 4, 5), (7, 9, 8)
    mask = box(*(slice(l, h) for l, h in zip(lo, hi)), shape=(16, 16, 16))
    other = box(slice(0, 1), slice(0, 1), slice(0, 1), shape=(16, 16, 16))
    s = metrics.surfel_distances(mask, other, spacing)
    hand = box_surfels(lo, hi, spacing)
    assert len(s["pred_areas"]) == len(hand)
    assert sorted(s["pred_areas"]) == pytest.approx(sorted(hand.values()), rel=1e-12)
    # Distances: from each corner to the single voxel's nearest corner (that voxel spans [0, 1]^3).
    hand_d = [math.dist([max(v - 1, 0) * si for v, si in zip(c, spacing)], [0, 0, 0]) for c in hand]
    assert sorted(s["pred_to_ref"]) == pytest.approx(sorted(hand_d), rel=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.1, 2.3)])
def test_far_blob_brats_vs_medpy_by_hand(spacing):
    # Reference: an 8^3 cube A (voxels 2..9). Prediction: A plus a 3^3 blob B at voxels x 20..22,
    # y and z 4..6, far from A. A's surface elements coincide (distance 0 both ways); each corner
    # of B lies in front of A's x = 10 face, at (x - 10) * s_x from it. So ref -> pred is 0, and
    # pred -> ref is the 95th area percentile of [A's elements at 0] + [B's at (x - 10) s_x].
    # At 1 mm: A's area 294 + 84 * 0.7071 + 8 * 0.2165 = 355.1 mm^2, B's 24 + 24 * 0.7071 + 1.732
    # = 42.7 mm^2 (5.7 % of the pooled 752.9: the far blob). Cumulative share after A and
    # B's x = 20 plane (10.52 mm^2): 0.919; after x = 21 (10.83): 0.946; after x = 22: 0.974
    # >= 0.95, so HD95 = 12 mm. MedPy pools voxels: B's 26 surface voxels are 4.2 % of
    # 296 + 322, below 5 %: HD95 = 0. MedPy misses the blob; the official code does not.
    ref = box(slice(2, 10), slice(2, 10), slice(2, 10))
    pred = ref | box(slice(20, 23), slice(4, 7), slice(4, 7))
    a, b = box_surfels((2, 2, 2), (10, 10, 10), spacing), box_surfels((20, 4, 4), (23, 7, 7), spacing)
    distances = [0.0] * len(a) + [(c[0] - 10) * spacing[0] for c in b]
    expected = deepmind_percentile(distances, list(a.values()) + list(b.values()))
    if spacing == (1.0, 1.0, 1.0):
        assert expected == 12.0
        assert sum(b.values()) / (2 * sum(a.values()) + sum(b.values())) == pytest.approx(0.0567, abs=1e-4)
    assert metrics.hd95(pred, ref, spacing) == pytest.approx(expected, rel=1e-12)
    assert metrics.hd95(ref, pred, spacing) == pytest.approx(expected, rel=1e-12)  # symmetric
    assert metrics.hd95(pred, ref, spacing, method="medpy") == 0.0


def ragged_blob(rng, shape, centre, radii, roughness):
    """An ellipsoid whose radius varies randomly with direction (a ragged, tumour-like boundary)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij"), -1)
    r = np.sqrt(np.sum((grid / np.asarray(radii)) ** 2, -1))
    bumps = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return r <= 1 + roughness * bumps / bumps.std()


def test_hd95_equals_deepmind_surface_distance():
    # The official BraTS 2023 code calls surface_distance.compute_surface_distances(gt, pred,
    # spacing) and compute_robust_hausdorff(..., 95); DeepMind's package is the reference here, on
    # ragged boundaries, sub-voxel anisotropic spacing, and a far false-positive blob holding 5-10 %
    # of the pooled surface area (the case where MedPy's pooled percentile is far off).
    import warnings

    import surface_distance

    rng = np.random.default_rng(0)
    shape = (32, 32, 28)
    ref = ragged_blob(rng, shape, (11, 11, 9), (8, 7, 6), 0.15)
    near = ragged_blob(rng, shape, (12, 11, 9), (8, 8, 6), 0.15)
    cases = {"ragged": (near, (1.0, 1.0, 1.0)), "ragged, anisotropic": (near, (0.9, 1.1, 2.3))}
    for radius in (2.5, 3.3):  # the blob holds 5.3 % and 8.4 % of the pooled surface area
        cases[f"far blob r={radius}"] = (near | ragged_blob(rng, shape, (27, 27, 23), (radius,) * 3, 0.0),
                                         (0.9, 1.1, 2.3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package uses scipy.ndimage.filters
        for name, (pred, spacing) in cases.items():
            official = surface_distance.compute_robust_hausdorff(
                surface_distance.compute_surface_distances(ref, pred, spacing), 95)
            ours = metrics.hd95(pred, ref, spacing)
            assert ours == pytest.approx(official, rel=1e-12), name
            s = metrics.surfel_distances(pred, ref, spacing)
            if name.startswith("far"):
                # The blob's share of the pooled surface area, and how far MedPy falls below.
                blob = s["pred_areas"][s["pred_to_ref"] > 15].sum()
                share = blob / (s["pred_areas"].sum() + s["ref_areas"].sum())
                assert 0.05 <= share <= 0.10, (name, share)
                assert ours > 20, name  # the blob sets the official value
        # At 5.3 % the blob is under 5 % of MedPy's pooled voxel list: MedPy gives 4.4 mm, not 25.1.
        pred, spacing = cases["far blob r=2.5"]
        assert metrics.hd95(pred, ref, spacing, method="medpy") < 5 < 25 < metrics.hd95(pred, ref, spacing)
    # A missing region: the official code's infinite distance becomes the penalty, 374.
    assert metrics.hd95(np.zeros(shape, bool), ref, (0.9, 1.1, 2.3)) == 374.0


def test_lesion_wise_hd95_uses_the_method():
    # One lesion (8^3 cube), matched by a prediction that also holds a far blob joined to it by a
    # one-voxel bridge (one component): the lesion's HD95 is hd95() of the pair, by either method.
    ref = box(slice(2, 10), slice(2, 10), slice(2, 10))
    pred = ref | box(slice(20, 23), slice(4, 7), slice(4, 7)) | box(slice(10, 20), 5, 5)
    for method in metrics.HD95_METHODS:
        lw = metrics.lesion_wise(pred, ref, method=method)
        assert (lw["num_tp"], lw["num_fp"], lw["num_fn"]) == (1, 0, 0)
        assert lw["hd95"] == metrics.hd95(pred, ref, method=method)
    assert metrics.lesion_wise(pred, ref)["hd95"] > metrics.lesion_wise(pred, ref, method="medpy")["hd95"]
