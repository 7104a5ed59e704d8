"""nnU-Net v2 raw datasets in and out, through the commands users run: export_nnunet, convert,
predict and evaluate."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep import convert, export_nnunet
from segguided_jax.evaluation import evaluate
from segguided_jax.inference import predict
from segguided_jax.data.brats import EDITIONS, MODALITIES
from segguided_jax.data.records import CaseSource, load_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The settings conftest's data_dir was converted with.
CONVERT_ARGS = ["--test-cases", "2", "--val-cases", "2", "--split-seed", "0", "--cases-per-shard", "3"]
BRATS_TO_NNUNET = np.array([0, 2, 1, 0, 3], np.uint8)  # BraTS 2021 value -> nnU-Net's BraTS value


def _read(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def _rows(path):
    with open(path) as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def exported(raw_dir, data_dir, tmp_path_factory):
    """The dataset the export command writes, run as users run it."""
    out = str(tmp_path_factory.mktemp("nnUNet_raw") / "Dataset137_BraTS2021")
    run = subprocess.run([sys.executable, "-m", "data_prep.export_nnunet", "--src", raw_dir, "--out", out, "--splits",
                          os.path.join(data_dir, "splits.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_exported_then_converted_gives_the_same_records(exported, data_dir, tmp_path):
    out = tmp_path / "prepared"
    convert.main(["--src", exported, "--out", str(out)] + CONVERT_ARGS)
    ours, theirs = load_manifest(data_dir), load_manifest(str(out))
    assert theirs["edition"] == "nnunet" and theirs["shards"] == ours["shards"]
    for name in ours["shards"]:
        assert (out / name).read_bytes() == open(os.path.join(data_dir, name), "rb").read(), name
    assert json.load(open(out / "splits.json")) == json.load(open(os.path.join(data_dir, "splits.json")))

    def geometry(manifest):  # everything but the input files' names
        return [{k: v for k, v in c.items() if k != "files"} for c in manifest["cases"]]

    assert geometry(theirs) == geometry(ours)


def test_exported_dataset_follows_the_nnunet_format(exported, raw_dir, data_dir):
    """The rules of nnU-Net v2's documentation/dataset_format.md, as its verify_dataset_integrity
    checks them: folder name DatasetXXX_Name; dataset.json with channel_names, labels, numTraining,
    file_ending; background 0 and consecutive label values; regions_class_order with one value per
    region; numTraining = the imagesTr cases; every case with each channel CASE_XXXX<file_ending>
    (four digits) and labelsTr/CASE<file_ending>, nothing else; label values from dataset.json;
    images and label on one grid (shape, spacing, affine), no NaN. And ours: channels and labels in
    nnU-Net's BraTS convention, splits_final.json = our folds, test cases only in imagesTs."""
    root, name = exported, os.path.basename(exported)
    assert re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_]+", name)
    spec = json.load(open(os.path.join(root, "dataset.json")))
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= set(spec)
    ending, channels = spec["file_ending"], len(spec["channel_names"])
    assert ending == ".nii.gz" and sorted(spec["channel_names"], key=int) == [str(k) for k in range(channels)]
    values = sorted({v for x in spec["labels"].values() for v in (x if isinstance(x, list) else [x])})
    assert spec["labels"]["background"] == 0 and values == list(range(len(values)))
    assert len(spec["regions_class_order"]) == len(spec["labels"]) - 1

    splits = json.load(open(os.path.join(data_dir, "splits.json")))
    test = splits["holdout"]["test"]
    ids = sorted({n[: -len(ending) - 5] for n in os.listdir(os.path.join(root, "imagesTr"))})
    assert len(ids) == spec["numTraining"] == 8 - len(test) and not set(ids) & set(test)
    assert sorted(os.listdir(os.path.join(root, "imagesTr"))) == [f"{c}_{k:04d}{ending}" for c in ids
                                                                   for k in range(channels)]
    assert sorted(os.listdir(os.path.join(root, "labelsTr"))) == [c + ending for c in ids]
    assert sorted(os.listdir(os.path.join(root, "imagesTs"))) == [f"{c}_{k:04d}{ending}" for c in sorted(test)
                                                                   for k in range(channels)]
    brats = EDITIONS["2021"]
    for folder, case_ids in (("Tr", ids), ("Ts", test)):
        for c in case_ids:
            label = nib.load(os.path.join(root, f"labels{folder}", c + ending))
            seg = np.asanyarray(label.dataobj)
            assert set(np.unique(seg).tolist()) <= set(values)
            original = _read(brats.seg_file(os.path.join(raw_dir, c)))
            assert np.array_equal(seg, BRATS_TO_NNUNET[original])  # BraTS 2 ED -> 1, 1 NCR -> 2, 4 ET -> 3
            files = brats.modality_files(os.path.join(raw_dir, c))
            for k, m in enumerate(("t1", "t1ce", "t2", "flair")):  # nnU-Net's BraTS channel order
                path = os.path.join(root, f"images{folder}", f"{c}_{k:04d}{ending}")
                assert open(path, "rb").read() == open(files[m], "rb").read()
                img = nib.load(path)
                assert img.shape == label.shape and np.allclose(img.affine, label.affine)
                assert img.header.get_zooms() == label.header.get_zooms()
                assert not np.isnan(np.asanyarray(img.dataobj)).any()

    final = json.load(open(os.path.join(root, "splits_final.json")))
    assert final == [{"train": splits[k]["train"], "val": splits[k]["val"]}
                     for k in [f"fold{i}" for i in range(splits["folds"])] + ["holdout"]]
    for fold in final:
        assert sorted(fold["train"] + fold["val"]) == ids


def test_export_refuses_a_name_nnunet_cannot_read_and_leaves_nothing(raw_dir, tmp_path):
    with pytest.raises(SystemExit, match="DatasetXXX_Name"):
        export_nnunet.main(["--src", raw_dir, "--out", str(tmp_path / "BraTS2021")])
    src = tmp_path / "src"
    for c in sorted(os.listdir(raw_dir))[:2]:
        shutil.copytree(os.path.join(raw_dir, c), src / c)
    bad = src / c / f"{c}_t2.nii.gz"
    open(bad, "wb").write(open(bad, "rb").read()[:100])  # truncated: found after the first case is written
    with pytest.raises(SystemExit, match=f"case {c}: cannot read {bad}"):
        export_nnunet.main(["--src", str(src), "--out", str(tmp_path / "Dataset001_X")])
    assert os.listdir(tmp_path) == ["src"]


# --- an MSD Task01 folder as nnU-Net's convert_MSD_dataset writes it ---

MSD_CHANNEL_NAMES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # MSD's "modality", renamed
MSD_PLAIN = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
MSD_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
MSD_SOURCE = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}  # MSD's channel of each modality
SHAPE = (16, 16, 12)
# A known voxel of each class: (voxel, MSD label value, internal label).
KNOWN = [((5, 5, 4), 1, 2), ((8, 8, 6), 2, 1), ((10, 9, 6), 3, 3), ((3, 12, 3), 0, 0)]


def _write_msd_as_nnunet(root, labels=MSD_PLAIN, ending=".nii.gz", cases=2, test_cases=1):
    """What nnU-Net's MSD conversion writes for Task01: the 4D images split into 3D channel files
    with the 4D image's spacing and origin, labels copied, dataset.json with "modality" renamed
    channel_names and "labels" inverted to {name: value}."""
    rng = np.random.default_rng(0)
    affine = np.array([[1.0, 0, 0, -8], [0, 1.0, 0, -8], [0, 0, 1.5, -9], [0, 0, 0, 1]])
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, folder))
    for i in range(cases + test_cases):
        case_id, folder = f"BRATS_{i:03d}", "imagesTr" if i < cases else "imagesTs"
        brain = np.zeros(SHAPE, bool)
        brain[2:14, 2:14, 2:10] = True
        for ch in range(4):  # each channel its own level: the records say which file fed which channel
            data = np.where(brain, 100.0 * (ch + 1) + rng.integers(0, 30, SHAPE), 0).astype(np.float32)
            nib.save(nib.Nifti1Image(data, affine), os.path.join(root, folder, f"{case_id}_{ch:04d}{ending}"))
        if i < cases:
            seg = np.zeros(SHAPE, np.uint8)
            for voxel, value, _ in KNOWN:
                seg[voxel] = value
            nib.save(nib.Nifti1Image(seg, affine), os.path.join(root, "labelsTr", case_id + ending))
    spec = {"name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images",
            "tensorImageSize": "4D", "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
            "licence": "CC-BY-SA 4.0", "release": "2.0 04/05/2018", "labels": labels,
            "numTraining": cases, "file_ending": ending, "channel_names": MSD_CHANNEL_NAMES}
    if any(isinstance(v, list) for v in labels.values()):
        spec["regions_class_order"] = [1, 2, 3]
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(spec, f)
    return root


@pytest.mark.parametrize("labels, ending", [(MSD_PLAIN, ".nii.gz"), (MSD_REGIONS, ".nii")], ids=["plain", "regions"])
def test_msd_task01_converted_by_nnunet_converts_with_its_channels_and_labels(tmp_path, labels, ending):
    root = _write_msd_as_nnunet(str(tmp_path / "Dataset001_BrainTumour"), labels, ending)
    out = tmp_path / "prepared"
    convert.main(["--src", root, "--out", str(out), "--test-cases", "0", "--val-cases", "1", "--folds", "0"])
    assert json.load(open(out / "splits.json"))["predict"] == ["BRATS_002"]  # imagesTs: prediction only
    seen = 0
    for part in ("train", "val"):
        source = CaseSource(str(out), part)
        for i, meta in enumerate(source.cases):
            case, lo = source[i], [b[0] for b in meta["crop_box"]]
            for voxel, _, internal in KNOWN:
                assert case["label"][tuple(v - o for v, o in zip(voxel, lo))] == internal, (voxel, internal)
            box = tuple(slice(a, b) for a, b in meta["crop_box"])
            for k, m in enumerate(MODALITIES):
                name = f"{meta['id']}_{MSD_SOURCE[m]:04d}{ending}"
                assert name in meta["files"]
                src = _read(tmp_path / "Dataset001_BrainTumour" / "imagesTr" / name)[box].astype(np.float64)
                inside = src != 0
                expected = np.where(inside, (src - src[inside].mean()) / src[inside].std(), 0)
                np.testing.assert_allclose(case["image"][..., k], expected, atol=1e-4, err_msg=m)
            seen += 1
    assert seen == 2


# --- bad input: a named error, and nothing written ---

def _edit_json(**changes):
    def edit(root):
        path = os.path.join(root, "dataset.json")
        spec = json.load(open(path))
        spec.update(changes)
        json.dump(spec, open(path, "w"))
    return edit


def _rewrite(rel, fn):
    def edit(root):
        path = os.path.join(root, rel)
        img = nib.load(path)
        nib.save(nib.Nifti1Image(fn(np.asanyarray(img.dataobj).copy()), img.affine), path)
    return edit


def _shift(rel):
    def edit(root):
        path = os.path.join(root, rel)
        img = nib.load(path)
        affine = img.affine.copy()
        affine[0, 3] += 4
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), path)
    return edit


def _set_voxel(a):
    a[0, 0, 0] = 5
    return a


BAD = [  # (id, damage, the file the message names, what it says)
    ("missing-channel", lambda r: os.remove(os.path.join(r, "imagesTr", "BRATS_001_0002.nii.gz")),
     "imagesTr/BRATS_001_0002.nii.gz", "case BRATS_001: missing file"),
    ("labels-without-images", lambda r: shutil.copy(os.path.join(r, "labelsTr", "BRATS_001.nii.gz"),
                                                    os.path.join(r, "labelsTr", "BRATS_007.nii.gz")),
     "labelsTr/BRATS_007.nii.gz", "case BRATS_007: label file"),
    ("shape", _rewrite("imagesTr/BRATS_001_0001.nii.gz", lambda a: a[:-2]),
     "imagesTr/BRATS_001_0001.nii.gz", "case BRATS_001"),
    ("affine", _shift("labelsTr/BRATS_001.nii.gz"), "labelsTr/BRATS_001.nii.gz", "another affine"),
    ("label-value", _rewrite("labelsTr/BRATS_001.nii.gz", _set_voxel),
     "labelsTr/BRATS_001.nii.gz", "label value(s) [5] outside"),
    ("file-ending", _edit_json(file_ending=".nii"), "imagesTr/BRATS_000_0000.nii.gz", "unexpected file"),
    ("channel-names", _edit_json(channel_names={"0": "a", "1": "b", "2": "c", "3": "d"}),
     "dataset.json", "0: 'a', 1: 'b', 2: 'c', 3: 'd'"),
    ("label-names", _edit_json(labels={"background": 0, "x": 1, "y": 2, "z": 3}), "dataset.json", "'x'"),
]


@pytest.mark.parametrize("damage, file, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_nnunet_input_is_named_and_writes_nothing(tmp_path, capsys, damage, file, message):
    root = _write_msd_as_nnunet(str(tmp_path / "Dataset001_BrainTumour"), test_cases=0)
    damage(root)
    out = tmp_path / "prepared"
    with pytest.raises(SystemExit) as err:
        convert.main(["--src", root, "--out", str(out), "--test-cases", "0", "--val-cases", "1", "--folds", "0",
                      "--cases-per-shard", "1"])
    text = str(err.value)
    assert os.path.join(root, file) in text and message in text, text
    assert not out.exists()


def test_unrecognised_channel_names_convert_with_channels_flag(tmp_path):
    """The flag names each channel's modality; the records equal those of recognised names."""
    root = _write_msd_as_nnunet(str(tmp_path / "Dataset001_BrainTumour"), test_cases=0)
    args = ["--test-cases", "0", "--val-cases", "1", "--folds", "0"]
    convert.main(["--src", root, "--out", str(tmp_path / "named")] + args)
    _edit_json(channel_names={"0": "a", "1": "b", "2": "c", "3": "d"})(root)
    convert.main(["--src", root, "--out", str(tmp_path / "flag"), "--channels", "FLAIR", "t1", "t1ce", "t2"] + args)
    named, flag = load_manifest(str(tmp_path / "named")), load_manifest(str(tmp_path / "flag"))
    assert flag["shards"] == named["shards"]
    for shard in named["shards"]:
        assert (tmp_path / "flag" / shard).read_bytes() == (tmp_path / "named" / shard).read_bytes()


# --- predict and evaluate ---

@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run  # the session's tiny model (conftest.py), trained once for every predict test


def test_predict_and_evaluate_on_nnunet_folders_match_the_brats_path(workdir, exported, raw_dir, data_dir, tmp_path):
    test = json.load(open(os.path.join(data_dir, "splits.json")))["holdout"]["test"]
    common = ["--workdir", workdir, "--no-tta", "--no-panels"]
    brats, nn, single = (str(tmp_path / d) for d in ("brats", "nnunet", "single"))
    assert predict.main(common + ["--out", brats, "--input"] + [os.path.join(raw_dir, c) for c in test]) == 0
    assert predict.main(common + ["--out", nn, "--input", os.path.join(exported, "imagesTs")]) == 0
    for c in test:
        ours, theirs = _read(os.path.join(brats, c + ".nii.gz")), _read(os.path.join(nn, c + ".nii.gz"))
        assert ours.any() and np.array_equal(theirs, BRATS_TO_NNUNET[ours])  # the dataset's own values
        for sub in ("NCR", "ED", "ET"):
            name = f"{c}_attention_{sub}.nii.gz"
            assert open(os.path.join(nn, name), "rb").read() == open(os.path.join(brats, name), "rb").read()
    # One case's channel files, written in BraTS values: the BraTS path's file, byte for byte.
    files = [os.path.join(exported, "imagesTs", f"{test[0]}_{k:04d}.nii.gz") for k in range(4)]
    assert predict.main(common + ["--out", single, "--output-format", "brats", "--input"] + files) == 0
    assert sorted(os.listdir(single)) == sorted(f"{test[0]}{s}.nii.gz" for s in
                                                ("", "_attention_NCR", "_attention_ED", "_attention_ET"))
    name = test[0] + ".nii.gz"
    assert open(os.path.join(single, name), "rb").read() == open(os.path.join(brats, name), "rb").read()
    # A BraTS folder written in nnU-Net's values: the nnU-Net path's file, byte for byte.
    assert predict.main(common + ["--out", single, "--output-format", "nnunet", "--no-attention",
                                  "--input", os.path.join(raw_dir, test[1])]) == 0
    name = test[1] + ".nii.gz"
    assert open(os.path.join(single, name), "rb").read() == open(os.path.join(nn, name), "rb").read()

    # Scored against the BraTS folders and against the nnU-Net labelsTs/: the same numbers.
    assert evaluate.main(["--pred", brats, "--ref", raw_dir, "--out", str(tmp_path / "s_brats")]) == 0
    assert evaluate.main(["--pred", nn, "--ref", os.path.join(exported, "labelsTs"),
                          "--out", str(tmp_path / "s_nnunet")]) == 0
    a, b = _rows(tmp_path / "s_brats" / "per_case.csv"), _rows(tmp_path / "s_nnunet" / "per_case.csv")
    assert sorted(b) == sorted(test)
    for c in test:
        metrics = [k for k in a[c] if k not in ("edition", "pred_file", "ref_file")]
        assert a[c]["status"] == "ok" and {k: a[c][k] for k in metrics} == {k: b[c][k] for k in metrics}


def _tumour(values):
    """A label map with ED, NCR and ET blocks in the given (NCR, ED, ET) values."""
    seg = np.zeros((16, 16, 12), np.uint8)
    seg[4:12, 4:12, 3:9] = values[1]
    seg[6:10, 6:10, 4:8] = values[0]
    seg[7:9, 7:9, 5:7] = values[2]
    return seg


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


@pytest.mark.parametrize("layout", ["brats", "nnunet"])
def test_reference_without_segmentation_is_reported_and_the_rest_scored(tmp_path, capsys, layout):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "scores"
    if layout == "brats":
        values, ids = (1, 2, 4), [f"BraTS2021_{i:05d}" for i in range(4)]
        for c in ids[:3]:
            _save(str(ref / c / f"{c}_seg.nii.gz"), _tumour(values))
        _save(str(ref / ids[3] / f"{ids[3]}_t1.nii.gz"), np.ones((16, 16, 12), np.int16))
        bad_file, ref_arg = str(ref / ids[3]), str(ref)
    else:
        values, ids = (2, 1, 3), [f"case{i}" for i in range(4)]
        ref = ref / "Dataset500_Mixed"
        for c in ids:
            _save(str(ref / "imagesTr" / f"{c}_0000.nii.gz"), np.ones((16, 16, 12), np.int16))
        for c in ids[:3]:
            _save(str(ref / "labelsTr" / f"{c}.nii.gz"), _tumour(values))
        json.dump({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}, "labels": MSD_REGIONS,
                   "regions_class_order": [1, 2, 3], "numTraining": 4, "file_ending": ".nii.gz"},
                  open(ref / "dataset.json", "w"))
        bad_file, ref_arg = str(ref / "labelsTr" / f"{ids[3]}.nii.gz"), str(ref / "labelsTr")
    for c in ids:
        _save(str(pred / f"{c}.nii.gz"), _tumour(values))
    assert evaluate.main(["--pred", str(pred), "--ref", ref_arg, "--out", str(out)]) == 1
    rows = _rows(out / "per_case.csv")
    assert {c: rows[c]["status"] for c in ids} == {**{c: "ok" for c in ids[:3]}, ids[3]: "error"}
    assert all(float(rows[c]["dice_wt"]) == 1.0 for c in ids[:3])
    assert bad_file in rows[ids[3]]["error"] and f"case {ids[3]}" in rows[ids[3]]["error"]
    assert bad_file in capsys.readouterr().err


def test_predictions_in_other_values_than_the_dataset_json_are_named(tmp_path, capsys):
    ref, pred = tmp_path / "Dataset500_X", tmp_path / "pred"
    _save(str(ref / "labelsTr" / "a.nii.gz"), _tumour((2, 1, 3)))
    json.dump({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}, "labels": MSD_REGIONS,
               "regions_class_order": [1, 2, 3], "numTraining": 1, "file_ending": ".nii.gz"},
              open(ref / "dataset.json", "w"))
    _save(str(pred / "a.nii.gz"), _tumour((1, 2, 4)))  # BraTS 2021 values: ET = 4
    assert evaluate.main(["--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "s")]) == 1
    error = _rows(tmp_path / "s" / "per_case.csv")["a"]["error"]
    assert "label values [4] are not nnU-Net Dataset500_X labels [0, 2, 1, 3]" in error and str(pred) in error


def test_nnunet_predictions_of_a_nii_dataset_are_scored(tmp_path):
    """nnU-Net writes predictions with the dataset's file_ending: CASE.nii for a .nii dataset."""
    ref, pred = tmp_path / "Dataset501_Y", tmp_path / "pred"
    os.makedirs(ref / "labelsTr")
    os.makedirs(pred)
    nib.save(nib.Nifti1Image(_tumour((2, 1, 3)), np.eye(4)), str(ref / "labelsTr" / "a.nii"))
    json.dump({"channel_names": MSD_CHANNEL_NAMES, "labels": MSD_PLAIN, "numTraining": 1, "file_ending": ".nii"},
              open(ref / "dataset.json", "w"))
    nib.save(nib.Nifti1Image(_tumour((2, 1, 2)), np.eye(4)), str(pred / "a.nii"))  # ET taken for NCR
    assert evaluate.main(["--pred", str(pred), "--ref", str(ref / "labelsTr"), "--out", str(tmp_path / "s")]) == 0
    row = _rows(tmp_path / "s" / "per_case.csv")["a"]
    assert [row["status"]] + [float(row[f"dice_{r}"]) for r in ("wt", "tc", "et")] == ["ok", 1.0, 1.0, 0.0]


def test_an_nnunet_dataset_in_a_bucket_converts_and_evaluates(exported, data_dir, gcs_dir, tmp_path):
    """The exported dataset copied to the storage emulator: the convert command reads it from
    the bucket into the records the local dataset gives (dataset.json, channel files and labels
    all through storage), and evaluate scores against its labelsTs/ there as against the local
    one. The predictions are the reference labels themselves, so every Dice is 1."""
    from segguided_jax.io import storage

    bucket = storage.join(gcs_dir, os.path.basename(exported))
    storage.copy_tree(exported, bucket)
    out = tmp_path / "prepared"
    run = subprocess.run([sys.executable, "-m", "data_prep.convert", "--src", bucket, "--out", str(out)] + CONVERT_ARGS,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = load_manifest(data_dir), load_manifest(str(out))
    assert theirs["edition"] == "nnunet" and theirs["shards"] == ours["shards"]
    for name in ours["shards"]:
        assert (out / name).read_bytes() == open(os.path.join(data_dir, name), "rb").read(), name

    scores = {}
    for where, ref in (("local", os.path.join(exported, "labelsTs")), ("bucket", storage.join(bucket, "labelsTs"))):
        run = subprocess.run([sys.executable, "-m", "segguided_jax.evaluate", "--pred", os.path.join(exported, "labelsTs"),
                              "--ref", ref, "--out", str(tmp_path / where)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        scores[where] = _rows(tmp_path / where / "per_case.csv")
    assert sorted(scores["bucket"]) == sorted(scores["local"]) and len(scores["bucket"]) == 2
    for case, row in scores["bucket"].items():
        assert row["status"] == "ok" and float(row["dice_wt"]) == 1.0, row
        metrics = [k for k in row if k not in ("pred_file", "ref_file")]
        assert {k: row[k] for k in metrics} == {k: scores["local"][case][k] for k in metrics}
