"""The evaluate CLI end to end on tiny NIfTI cases written here."""
from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from segguided_jax import evaluate

SHAPE = (16, 16, 12)
SPACING = (1.0, 1.0, 2.5)


def save(path, array, spacing=SPACING):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag(list(spacing) + [1.0])), path)


def tumour(et_value):
    """Edition label values: ED 8x8x4 block (label 2) holding an ET 4x4x2 block (32 voxels, 80 mm^3)."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:12, 4:12, 4:8] = 2
    seg[6:10, 6:10, 5:7] = et_value
    return seg


def quiet(*args, **kwargs):
    pass


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end(tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    seg = tumour(4)  # BraTS 2021: ET = 4
    for i in range(3):
        save(str(ref / f"BraTS2021_0000{i}" / f"BraTS2021_0000{i}_seg.nii.gz"), seg)
    # Case 0: exact, with an ET attention map of 0.5 on the ET mask (soft Dice 2/3, mass inside 1).
    save(str(pred / "BraTS2021_00000.nii.gz"), seg)
    save(str(pred / "BraTS2021_00000_attention_ET.nii.gz"), (seg == 4).astype(np.float32) * 0.5)
    # Case 1: ET predicted as oedema: ET and TC empty (Dice 0, HD95 374, lesion-wise 0 / 374), WT exact.
    save(str(pred / "BraTS2021_00001.nii.gz"), np.where(seg == 4, 2, seg).astype(np.uint8))
    # Case 2 has no prediction; case 9 has no reference.
    save(str(pred / "BraTS2021_00009.nii.gz"), seg)

    evaluate.main(["--pred", str(pred), "--ref", str(ref), "--out", str(out)])

    rows = {r["case_id"]: r for r in read_csv(out / "per_case.csv")}
    assert {c: r["status"] for c, r in rows.items()} == {
        "BraTS2021_00000": "ok", "BraTS2021_00001": "ok",
        "BraTS2021_00002": "missing_prediction", "BraTS2021_00009": "missing_reference"}
    exact, no_et = rows["BraTS2021_00000"], rows["BraTS2021_00001"]
    for r in ("et", "tc", "wt"):
        assert float(exact[f"dice_{r}"]) == 1.0 and float(exact[f"hd95_{r}"]) == 0.0
    assert float(exact["attention_soft_dice_et"]) == pytest.approx(2 / 3)
    assert float(exact["attention_mass_inside_et"]) == 1.0
    assert no_et["attention_soft_dice_et"] == ""  # no map for this case
    assert float(no_et["dice_et"]) == 0.0 and float(no_et["hd95_et"]) == 374.0
    assert float(no_et["lesion_dice_tc"]) == 0.0 and float(no_et["lesion_hd95_tc"]) == 374.0
    assert no_et["lesion_fn_et"] == "1"
    assert float(no_et["dice_wt"]) == 1.0 and no_et["spacing"] == "1x1x2.5"
    assert rows["BraTS2021_00002"]["dice_et"] == ""

    summary = {r["metric"]: r for r in read_csv(out / "summary.csv")}
    assert float(summary["dice_et"]["mean"]) == 0.5 and summary["dice_et"]["n"] == "2"

    with open(out / "metrics.json") as f:
        result = json.load(f)
    assert result["num_evaluated"] == 2
    assert result["missing_prediction"] == ["BraTS2021_00002"]
    assert result["missing_reference"] == ["BraTS2021_00009"]
    s = result["summary"]["dice_et"]
    # Values [1, 0]: mean 0.5, sample std sqrt(0.5), median 0.5, quartiles 0.25 and 0.75.
    assert (s["n"], s["mean"], s["median"], s["q25"], s["q75"]) == (2, 0.5, 0.5, 0.25, 0.75)
    assert s["std"] == pytest.approx(np.sqrt(0.5))
    assert result["summary"]["hd95_et"]["mean"] == 187.0
    assert result["summary"]["attention_soft_dice_et"]["n"] == 1
    assert "attention_soft_dice_ncr" not in result["summary"]
    assert result["definitions"]["hd95"].endswith("[mm]")
    for name in ("dice", "hd95", "sensitivity", "specificity", "lesion_dice", "lesion_hd95",
                 "attention_soft_dice", "attention_mass_inside"):
        path = out / f"boxplot_{name}.png"
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_2023_folders_flat_references_and_diagonal(tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    seg = tumour(3)  # BraTS 2023: ET = 3
    save(str(ref / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz"), seg)
    save(str(ref / "BraTS-GLI-00001-000.nii.gz"), seg)  # a flat reference
    save(str(pred / "BraTS-GLI-00000-000.nii.gz"), seg)
    save(str(pred / "BraTS-GLI-00001-000.nii.gz"), np.where(seg == 3, 2, seg).astype(np.uint8))
    result = evaluate.evaluate(str(pred), str(ref), str(out), empty_hd95="diagonal", log=quiet)
    cases = {r["case_id"]: r for r in result["cases"]}
    assert cases["BraTS-GLI-00000-000"]["dice_et"] == 1.0
    diagonal = np.sqrt(16 ** 2 + 16 ** 2 + 30 ** 2)
    assert cases["BraTS-GLI-00001-000"]["hd95_et"] == pytest.approx(diagonal)
    assert cases["BraTS-GLI-00001-000"]["lesion_hd95_et"] == pytest.approx(diagonal)
    assert result["missing_prediction"] == [] and result["missing_reference"] == []


def test_errors_name_the_case_and_files(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    seg = tumour(4)
    save(str(ref / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"), seg)
    save(str(pred / "BraTS2021_00000.nii.gz"), seg[:, :, :10])
    with pytest.raises(ValueError, match=r"BraTS2021_00000.*pred.*\(16, 16, 10\).*ref.*\(16, 16, 12\)"):
        evaluate.evaluate(str(pred), str(ref), str(tmp_path / "out"), log=quiet)
    # A 2023-valued prediction (ET = 3) against 2021 references is caught, not silently mis-scored.
    save(str(pred / "BraTS2021_00000.nii.gz"), tumour(3))
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        evaluate.evaluate(str(pred), str(ref), str(tmp_path / "out"), log=quiet)
    # A case id that names no edition needs --edition.
    save(str(ref / "patient7.nii.gz"), seg)
    with pytest.raises(ValueError, match="--edition"):
        evaluate.evaluate(str(pred), str(ref), str(tmp_path / "out"), log=quiet)
