"""Metrics with answers worked out by hand (see each test's comment)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from segguided_jax import metrics

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


def test_shifted_cube_anisotropic():
    # A 10^3 cube and the same cube shifted by k = 2 voxels along z, spacing (1, 1, 2.5) mm.
    # Dice = overlap 10*10*8 / 1000 = 0.8. Every surface voxel of either cube is within k voxels
    # along z (5 mm) of the other's surface, and the whole bottom (top) face, 100 of the 488 surface
    # voxels (20 % > 5 %), is exactly 5 mm away: HD95 = 5 mm in both directions.
    ref = box(slice(5, 15), slice(5, 15), slice(5, 15))
    pred = box(slice(5, 15), slice(5, 15), slice(7, 17))
    assert metrics.dice(pred, ref) == pytest.approx(0.8)
    assert metrics.hd95(pred, ref, (1.0, 1.0, 2.5)) == pytest.approx(5.0)
    assert metrics.surface_distances(pred, ref, (1.0, 1.0, 2.5)).max() == pytest.approx(5.0)
    assert metrics.surface_distances(pred, ref, (1.0, 1.0, 2.5)).size == 10 ** 3 - 8 ** 3
    # The spacing's axis order matters: the same shift measured with 2.5 mm along x is 2 mm.
    assert metrics.hd95(pred, ref, (2.5, 1.0, 1.0)) == pytest.approx(2.0)
    # Sensitivity 800/1000; specificity: TN = 32^3 - 1200 (union), negatives = 32^3 - 1000.
    assert metrics.sensitivity(pred, ref) == pytest.approx(0.8)
    assert metrics.specificity(pred, ref) == pytest.approx((32 ** 3 - 1200) / (32 ** 3 - 1000))


def test_single_voxels_and_robustness():
    # Two single voxels 3 slices apart at 2.5 mm: every distance is 7.5 mm.
    a, b = box(5, 5, 5), box(5, 5, 8)
    assert metrics.hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(7.5)
    # One stray voxel 16 voxels above the cube's top face: its distance (16 mm) is 1 of 1 + 2*488
    # pooled distances (< 5 %), all others are 0, so HD95 is 0 while the Hausdorff distance is 16.
    ref = box(slice(5, 15), slice(5, 15), slice(5, 15))
    pred = ref | box(5, 5, 30)
    assert metrics.surface_distances(pred, ref, (1, 1, 1)).max() == 16.0
    assert metrics.hd95(pred, ref, (1, 1, 1)) == 0.0


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
    # The optional penalty: BraTS's 374 is the 1 mm BraTS volume's diagonal, 373.1, rounded up.
    diagonal = metrics.volume_diagonal((240, 240, 155), (1, 1, 1))
    assert math.ceil(diagonal) == 374
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
    # Predicting ET as NCR: ET empty in the prediction (Dice 0, HD95 374); TC and WT unchanged.
    out = metrics.case_metrics(np.where(labels == 3, 1, labels), labels)
    assert (out["dice_et"], out["hd95_et"], out["dice_tc"], out["dice_wt"]) == (0.0, 374.0, 1.0, 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        metrics.hd95(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1, 1))
