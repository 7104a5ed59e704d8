import numpy as np
import pytest

from segguided_jax.data.brats import labels_to_regions
from segguided_jax.inference.postprocess import CANDIDATES_MM3, PostProcessing, choose, fit_scores


def _probs(labels):
    return labels_to_regions(labels).astype(np.float32)


def _et_specks():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:11, 1:11, 1:11] = 2  # oedema everywhere else
    labels[2, 2, 2] = 3  # 1 voxel
    labels[5, 2:7, 2] = 3  # 5 voxels in a row
    labels[2:5, 9, 9] = 3  # 3 + 3 voxels touching only at a corner, (4, 9, 9) and (5, 10, 10):
    labels[5:8, 10, 10] = 3  # one component of 6 with 26-connectivity (two of 3 with 6-connectivity)
    labels[9, 2:9, 7] = 3  # 7 voxels
    labels[9, 9, 2] = 1  # NCR stays NCR
    return labels


def test_et_rule_per_component():
    labels = _et_specks()
    before = np.bincount(labels.ravel(), minlength=4)
    out = PostProcessing(min_et_voxels=6).labels(_probs(labels), (1, 1, 1))
    assert out[2, 2, 2] == 1 and (out[5, 2:7, 2] == 1).all()
    assert (out[2:5, 9, 9] == 3).all() and (out[5:8, 10, 10] == 3).all() and (out[9, 2:9, 7] == 3).all()
    changed = out != labels
    assert changed.sum() == 6 and (labels[changed] == 3).all()
    assert np.bincount(out.ravel(), minlength=4)[2] == before[2]
    np.testing.assert_array_equal(PostProcessing().labels(_probs(labels), (1, 1, 1)), labels)
    assert PostProcessing(min_et_voxels=8).labels(_probs(labels), (1, 1, 1))[9, 3, 7] == 1


def test_et_rule_whole_case_as_nnunet():
    labels = _et_specks()  # 1 + 5 + 6 + 7 = 19 ET voxels in all
    case = PostProcessing(et_rule="case", min_et_voxels=20).labels(_probs(labels), (1, 1, 1))
    assert not (case == 3).any() and ((case == 1) == ((labels == 1) | (labels == 3))).all()
    np.testing.assert_array_equal(PostProcessing(et_rule="case", min_et_voxels=19).labels(_probs(labels), (1, 1, 1)),
                                  labels)
    with pytest.raises(ValueError, match="et_rule"):
        PostProcessing(et_rule="bogus")


def test_component_removal_by_volume_and_region():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 2:12, 2:12] = 2  # the tumour: 1000 voxels of WT ...
    labels[4:10, 4:10, 4:10] = 1  # ... with a core ...
    labels[5:8, 5:8, 5:8] = 3  # ... and enhancement
    labels[16:18, 16:18, 16:18] = 3  # a speck of "enhancing tumour": 8 voxels of WT, TC and ET
    labels[15, 2, 15] = 2  # a speck of oedema: 1 voxel
    spacing = (2.0, 1.0, 1.0)  # 2 mm³ voxels
    wt = PostProcessing(min_volume_mm3={"WT": 20.0, "TC": 0.0, "ET": 0.0}).labels(_probs(labels), spacing)
    assert not wt[16:18, 16:18, 16:18].any() and wt[15, 2, 15] == 0  # 16 and 2 mm³ < 20: gone entirely
    np.testing.assert_array_equal(wt[:13, :13, :13], labels[:13, :13, :13])
    tc = PostProcessing(min_volume_mm3={"WT": 0.0, "TC": 20.0, "ET": 0.0}).labels(_probs(labels), spacing)
    assert (tc[16:18, 16:18, 16:18] == 2).all() and tc[15, 2, 15] == 2  # the small core becomes oedema
    et = PostProcessing(min_volume_mm3={"WT": 0.0, "TC": 0.0, "ET": 20.0}).labels(_probs(labels), spacing)
    assert (et[16:18, 16:18, 16:18] == 1).all() and (et[5:8, 5:8, 5:8] == 3).all()  # small ET becomes NCR


def test_fit_chooses_the_size_that_removes_false_positive_specks():
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[4:14, 4:14, 4:14] = 2
    ref[6:12, 6:12, 6:12] = 3
    pred = ref.copy()
    pred[20, 20, 20] = 2  # a false-positive speck: 1 voxel of WT, 4 mm³ at 4 mm³ voxels
    pred[18:20, 2:4, 2:4] = 3  # a false-positive ET blob: 8 voxels = 32 mm³
    spacing = (1.0, 2.0, 2.0)
    scores = fit_scores(_probs(pred), ref, spacing, PostProcessing())
    total = scores + fit_scores(_probs(ref), ref, spacing, PostProcessing())
    learned = choose(total, 2, rule="smallest", floor_mm3=0.0)
    # ET: one true lesion and one false one give 1/2 without removal; 50 mm³ removes the blob.
    assert learned["lesion_dice_without"]["ET"] == pytest.approx((0.5 + 1.0) / 2)
    # the speck (4 mm³) and the blob (32 mm³, also WT and TC) both go at 50 mm³, not before
    assert learned["min_volume_mm3"] == {"ET": 50.0, "TC": 50.0, "WT": 50.0}
    assert len(learned["lesion_dice_by_candidate"]["TC"]) == len(CANDIDATES_MM3)
    cleaned = PostProcessing(min_volume_mm3=learned["min_volume_mm3"]).labels(_probs(pred), spacing)
    np.testing.assert_array_equal(cleaned, ref)
    # The default rule takes the middle of each plateau: ET and TC tie from 50 (the blob gone) to
    # 500 mm³ (the true ET, 864 mm³, goes at 1000), WT from 50 to 2500 (its lesion is 4,000 mm³).
    middle = choose(total, 2)
    assert middle["rule"] == "plateau_middle" and middle["floor_mm3"] == 50.0
    assert middle["min_volume_mm3"] == {"ET": 100.0, "TC": 100.0, "WT": 250.0}


# Mean val lesion-wise Dice per candidate (rows ET, TC, WT) with known plateaus.
_SCORES = np.array([
    [1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8],  # ET: tied on 0-25 (a true 30 mm³ lesion at 50)
    [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8],  # TC: tied on 50-500
    [0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7],  # WT: the val cases cannot decide
])


@pytest.mark.parametrize("rule, floor, expected", [
    ("smallest", 0.0, {"ET": 0.0, "TC": 50.0, "WT": 0.0}),
    ("smallest", 50.0, {"ET": 0.0, "TC": 50.0, "WT": 50.0}),  # the floor only where the run reaches it
    ("largest", 0.0, {"ET": 25.0, "TC": 500.0, "WT": 2500.0}),
    ("plateau_middle", 0.0, {"ET": 10.0, "TC": 100.0, "WT": 100.0}),
    ("plateau_middle", 50.0, {"ET": 10.0, "TC": 100.0, "WT": 100.0}),
    ("plateau_middle", 250.0, {"ET": 10.0, "TC": 250.0, "WT": 250.0}),
])
def test_choose_picks_by_rule_and_floor(rule, floor, expected):
    learned = choose(_SCORES * 3, 3, rule=rule, floor_mm3=floor)
    assert learned["min_volume_mm3"] == expected
    assert learned["lesion_dice_without"] == pytest.approx({"ET": 1.0, "TC": 0.5, "WT": 0.7})


def test_choose_takes_the_widest_of_separate_plateaus():
    scores = np.array([[1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9]] * 3)
    assert choose(scores, 1, floor_mm3=0.0)["min_volume_mm3"] == {"ET": 100.0, "TC": 100.0, "WT": 100.0}
    scores[:, 3:7] = 0.95  # now the first run holds the best alone
    assert choose(scores, 1, floor_mm3=0.0)["min_volume_mm3"] == {"ET": 0.0, "TC": 0.0, "WT": 0.0}
    with pytest.raises(ValueError, match="postprocess_rule"):
        choose(scores, 1, rule="median")
