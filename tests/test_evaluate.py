"""The evaluate CLI end to end on tiny NIfTI cases written here (once as `python -m`, as users run it)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from segguided_jax.evaluation import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

    # As users run it: the command, and the exit status the shell sees.
    run = subprocess.run([sys.executable, "-m", "segguided_jax.evaluate", "--pred", str(pred), "--ref", str(ref),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

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


def two_cases(tmp_path):
    """References for BraTS2021_00000 and _00001, a correct prediction for _00000; returns folders."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    seg = tumour(4)
    for i in range(2):
        save(str(ref / f"BraTS2021_0000{i}" / f"BraTS2021_0000{i}_seg.nii.gz"), seg)
    save(str(pred / "BraTS2021_00000.nii.gz"), seg)
    return ref, pred


def truncated(path):
    save(path, tumour(4).astype(np.float32))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def garbage(path):
    with open(path, "wb") as f:
        f.write(b"not a NIfTI file at all" * 10)


DAMAGE = {  # kind: (writes the damaged prediction, what the message must say)
    "label 7": (lambda p: save(p, np.where(tumour(4) == 2, 7, tumour(4)).astype(np.uint8)), r"label values \[7\]"),
    "2023 labels": (lambda p: save(p, tumour(3)), r"label values \[3\].*--edition"),
    "wrong shape": (lambda p: save(p, tumour(4)[:, :, :10]), r"shape \(16, 16, 10\).*reference.*\(16, 16, 12\)"),
    "NaN": (lambda p: save(p, np.where(tumour(4) == 4, np.nan, tumour(4)).astype(np.float32)), "non-integer"),
    "truncated": (truncated, r"cannot read the label map \(EOFError"),
    "not NIfTI": (garbage, "cannot read the label map"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_prediction_is_reported_and_the_rest_scored(tmp_path, capsys, kind):
    ref, pred = two_cases(tmp_path)
    bad = str(pred / "BraTS2021_00001.nii.gz")
    write, message = DAMAGE[kind]
    write(bad)
    out = tmp_path / "out"
    assert evaluate.main(["--pred", str(pred), "--ref", str(ref), "--out", str(out)]) == 1
    rows = {r["case_id"]: r for r in read_csv(out / "per_case.csv")}
    good, failed = rows["BraTS2021_00000"], rows["BraTS2021_00001"]
    assert good["status"] == "ok" and float(good["dice_wt"]) == 1.0 and good["error"] == ""
    assert failed["status"] == "error" and failed["dice_wt"] == "" and failed["pred_file"] == bad
    assert bad in failed["error"] and re.search(message, failed["error"]), failed["error"]
    stderr = capsys.readouterr().err
    assert "BraTS2021_00001" in stderr and bad in stderr and re.search(message, stderr)
    with open(out / "metrics.json") as f:
        result = json.load(f)
    assert result["num_evaluated"] == 1 and list(result["errors"]) == ["BraTS2021_00001"]
    assert result["summary"]["dice_wt"]["n"] == 1
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_a_damaged_reference_or_attention_map_names_its_file(tmp_path):
    ref, pred = two_cases(tmp_path)
    save(str(pred / "BraTS2021_00001.nii.gz"), tumour(4))
    truncated(str(ref / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"))
    attention = str(pred / "BraTS2021_00000_attention_ET.nii.gz")
    save(attention, np.full(SHAPE, 1.5, np.float32))  # outside [0, 1]
    errors = []
    result = evaluate.evaluate(str(pred), str(ref), str(tmp_path / "out"), log=quiet, err=errors.append)
    assert result["num_evaluated"] == 0 and len(errors) == 2
    assert "BraTS2021_00001_seg.nii.gz: cannot read the label map" in result["errors"]["BraTS2021_00001"]
    assert result["errors"]["BraTS2021_00000"].startswith(f"{attention}: attention map values must lie in [0, 1]")


def test_usage_errors_exit_2(tmp_path, capsys):
    ref, pred = two_cases(tmp_path)
    assert evaluate.main(["--pred", str(tmp_path / "nowhere"), "--ref", str(ref), "--out", str(tmp_path / "o")]) == 2
    assert "--pred" in capsys.readouterr().err
    # A case id that names no edition needs --edition.
    save(str(ref / "patient7.nii.gz"), tumour(4))
    with pytest.raises(ValueError, match="--edition"):
        evaluate.evaluate(str(pred), str(ref), str(tmp_path / "out"), log=quiet)
    assert evaluate.main(["--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "o")]) == 2
    assert "patient7" in capsys.readouterr().err


def test_2021_penalty_and_medpy_option(tmp_path):
    # ET predicted as oedema: ET empty. --empty-hd95 brats2021: classic HD95 373.13 (BraTS 2021),
    # lesion-wise 374 (only the 2023 code defines it). --hd95-method medpy is recorded.
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    save(str(ref / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"), tumour(4))
    save(str(pred / "BraTS2021_00000.nii.gz"), np.where(tumour(4) == 4, 2, tumour(4)).astype(np.uint8))
    out = tmp_path / "out"
    assert evaluate.main(["--pred", str(pred), "--ref", str(ref), "--out", str(out), "--empty-hd95", "brats2021",
                          "--hd95-method", "medpy"]) == 0
    row = read_csv(out / "per_case.csv")[0]
    assert float(row["hd95_et"]) == 373.13 and float(row["lesion_hd95_et"]) == 374.0
    assert (row["hd95_penalty"], row["lesion_hd95_penalty"]) == ("373.13", "374.0")
    with open(out / "metrics.json") as f:
        result = json.load(f)
    assert result["settings"]["hd95_method"] == "medpy" and result["settings"]["empty_hd95"] == "brats2021"
    assert "MedPy" in result["definitions"]["hd95"]


def test_write_per_case_schema(tmp_path):
    # case_id, status, every region metric column in a fixed order (present or not), attention
    # columns present in some row, the context columns some row has, then error.
    path = tmp_path / "per_case.csv"
    rows = [{"case_id": "b", "status": "ok", "dice_wt": 0.5, "hd95_et": float("nan"), "attention_soft_dice_ed": 0.25,
             "spacing": "1x1x1"},
            {"case_id": "a", "status": "error", "error": "a.nii.gz: cannot read"}]
    header = evaluate.write_per_case(str(path), rows)
    families = [fam for fam, _, _ in evaluate.REGION_FAMILIES]
    assert header[:2] == ["case_id", "status"]
    assert header[2:2 + 27] == [f"{fam}_{r}" for fam in families for r in ("et", "tc", "wt")]
    assert header[29:] == ["attention_soft_dice_ed", "spacing", "error"]
    written = read_csv(path)
    assert [r["case_id"] for r in written] == ["b", "a"]
    assert (written[0]["dice_wt"], written[0]["hd95_et"], written[0]["dice_et"]) == ("0.5", "nan", "")
    assert written[1]["error"] == "a.nii.gz: cannot read"
    with pytest.raises(ValueError, match="unknown columns"):
        evaluate.write_per_case(str(path), [{"case_id": "c", "status": "ok", "dice": 1.0}])
    with pytest.raises(ValueError, match="status"):
        evaluate.write_per_case(str(path), [{"case_id": "c", "status": "fine"}])
    assert read_csv(path) == written  # a refused write leaves the previous file as it was
