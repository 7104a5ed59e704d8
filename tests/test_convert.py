import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from data_prep import convert, synthetic
from segguided_jax.data import splits
from segguided_jax.data.brats import EDITIONS
from segguided_jax.data.cases import CaseError
from segguided_jax.io.storage import write_nifti_gz
from segguided_jax.data.preprocess import labels_to_original as to_original_grid
from segguided_jax.data.records import CaseSource, load_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *a, **k: None)


def _read(path):
    return np.asanyarray(nib.load(path).dataobj)


def _whole_shards_only(out):
    names = os.listdir(out) if out.exists() else []
    assert not [n for n in names if n.endswith(".tmp")]
    for n in names:
        if n.endswith(".array_record"):
            assert n + ".json" in names  # a shard under its final name is complete


def test_conversion_round_trip_is_exact(raw_dir, data_dir):
    manifest = load_manifest(data_dir)
    assert manifest["edition"] == "2021" and len(manifest["cases"]) == 8
    assert len(manifest["fingerprint"]) == 64
    for part in ("train", "val", "test"):
        source = CaseSource(data_dir, part)
        for i, meta in enumerate(source.cases):
            case = source[i]
            assert case["case_id"] == meta["id"]
            files = EDITIONS["2021"].modality_files(os.path.join(raw_dir, meta["id"]))
            seg_path = EDITIONS["2021"].seg_file(os.path.join(raw_dir, meta["id"]))
            restored = to_original_grid(case["label"], meta, "2021")
            assert restored.dtype == np.uint8 and np.array_equal(restored, _read(seg_path))
            # z-scored inside the brain, zero outside
            box = tuple(slice(a, b) for a, b in meta["crop_box"])
            brain = np.any([_read(files[m])[box] != 0 for m in files], axis=0)
            assert abs(case["image"][..., 0][brain].mean()) < 1e-4
            assert abs(case["image"][..., 0][brain].std() - 1) < 1e-3
            assert (case["image"][~brain] == 0).all()
            assert np.asarray(meta["affine"]) == pytest.approx(nib.load(seg_path).affine)


@pytest.mark.parametrize("edition", ["2021", "2023"])
def test_full_size_round_trip(tmp_path, edition):
    raw, out = tmp_path / "raw", tmp_path / "out"
    synthetic.write_case(str(raw), edition, 0, seed=9)  # 240 x 240 x 155
    convert.convert(str(raw), str(out), test_cases=0, val_cases=0, folds=0, **QUIET)
    manifest = load_manifest(str(out))
    meta = manifest["cases"][0]
    assert meta["orig_shape"] == [240, 240, 155]
    from grain.sources import ArrayRecordDataSource
    from segguided_jax.data.records import decode_case
    case = decode_case(ArrayRecordDataSource([str(out / manifest["shards"][0])])[0])
    seg = EDITIONS[edition].seg_file(str(raw / meta["id"]))
    assert np.array_equal(to_original_grid(case["label"], meta, edition), _read(seg))


def test_splits_are_deterministic_disjoint_and_reused(tmp_path):
    ids = [f"c{i:02d}" for i in range(23)]
    kw = dict(test_cases=5, val_cases=4, folds=3)
    a = splits.make_splits(ids, ["p1"], **kw, seed=4)
    assert a == splits.make_splits(ids, ["p1"], **kw, seed=4)
    assert a != splits.make_splits(ids, ["p1"], **kw, seed=5)
    hold = a["holdout"]
    assert (len(hold["test"]), len(hold["val"]), len(hold["train"])) == (5, 4, 14)
    assert sorted(hold["train"] + hold["val"] + hold["test"]) == ids
    non_test = sorted(hold["train"] + hold["val"])
    fold_vals = [c for k in range(3) for c in a[f"fold{k}"]["val"]]
    assert sorted(fold_vals) == non_test  # the folds partition the non-test cases
    for k in range(3):
        fold = a[f"fold{k}"]
        assert sorted(fold["train"] + fold["val"]) == non_test and not set(fold["val"]) & set(fold["train"])
        assert fold["test"] == hold["test"]  # every fold shares the held-out test set
    assert a["predict"] == ["p1"]
    splits.write_or_check(str(tmp_path), ids, [], **kw, seed=4)
    splits.write_or_check(str(tmp_path), ids, [], **kw, seed=4)  # reused
    with pytest.raises(ValueError, match="other settings"):
        splits.write_or_check(str(tmp_path), ids, [], **kw, seed=7)


def test_old_splits_without_a_test_part_are_refused_with_the_fix(data_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    current = json.load(open(old / "splits.json"))
    # What an older version wrote: no version, and `val` was the held-out test set.
    legacy = {"seed": 0, "val_cases": 2, "folds": 5, "predict": [],
              "holdout": {"train": current["holdout"]["train"] + current["holdout"]["val"],
                          "val": current["holdout"]["test"]}}
    json.dump(legacy, open(old / "splits.json", "w"))
    with pytest.raises(ValueError, match="older version.*delete .*splits.json.*data_prep.convert"):
        CaseSource(str(old), "train")


# --- bad input: each stops with the case and file named, and leaves no partial shard ---

def _copy_cases(raw_dir, tmp_path, n=2):
    src = tmp_path / "src"
    for case in sorted(os.listdir(raw_dir))[:n]:
        shutil.copytree(os.path.join(raw_dir, case), src / case)
    return src, sorted(os.listdir(src))[-1]


def _rewrite(path, fn):
    img = nib.load(path)
    data = fn(np.asanyarray(img.dataobj).copy())
    write_nifti_gz(nib.Nifti1Image(data, img.affine), path)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _shift_affine(path):
    img = nib.load(path)
    affine = img.affine.copy()
    affine[0, 3] += 5
    write_nifti_gz(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), path)


def _set_centre(value):
    def fn(a):
        a = a.astype(np.float32) if isinstance(value, float) else a
        a[a.shape[0] // 2, a.shape[1] // 2, a.shape[2] // 2] = value
        return a
    return fn


def _extra_file(path):
    shutil.copy(path, path.replace("_flair.", "_t1gd."))


BAD_INPUTS = [
    ("missing", "t2", os.remove, "missing file"),
    ("truncated", "flair", _truncate, "cannot read"),
    ("shape", "t1ce", lambda p: _rewrite(p, lambda a: a[:-2]), "has shape"),
    ("affine", "t1", _shift_affine, "another affine"),
    ("not3d", "t2", lambda p: _rewrite(p, lambda a: a[..., None, None].repeat(2, 3)), "expected a 3D volume"),
    ("nan", "flair", lambda p: _rewrite(p, _set_centre(float("nan"))), "NaN/Inf"),
    ("empty", "t1ce", lambda p: _rewrite(p, np.zeros_like), "empty brain"),
    ("label", "seg", lambda p: _rewrite(p, _set_centre(3)), "label value(s) [3]"),
    ("extra", "flair", _extra_file, "unexpected file"),
]


@pytest.mark.parametrize("kind, suffix, damage, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_case_and_file(raw_dir, tmp_path, kind, suffix, damage, message):
    src, bad_case = _copy_cases(raw_dir, tmp_path)
    bad_file = str(src / bad_case / f"{bad_case}_{suffix}.nii.gz")
    damage(bad_file)
    out = tmp_path / "out"
    with pytest.raises(CaseError) as err:
        convert.convert(str(src), str(out), cases_per_shard=1, **QUIET)
    text = str(err.value)
    if kind == "extra":
        bad_file = bad_file.replace("_flair.", "_t1gd.")
    assert bad_case in text and bad_file in text and message in text
    assert not (out / "manifest.json").exists()
    _whole_shards_only(out)
    assert not (out / "cases-00001-of-00002.array_record").exists()  # the bad case's shard


def test_duplicate_case_ids_across_sources(raw_dir, tmp_path):
    src, case = _copy_cases(raw_dir, tmp_path, n=1)
    other = tmp_path / "other"
    shutil.copytree(src / case, other / case)
    with pytest.raises(CaseError, match=f"case {case}: duplicate case id"):
        convert.convert([str(src), str(other)], str(tmp_path / "out"), **QUIET)


def test_skip_bad_converts_the_rest_and_reports(raw_dir, tmp_path):
    src, bad_case = _copy_cases(raw_dir, tmp_path, n=4)
    os.remove(src / bad_case / f"{bad_case}_t1.nii.gz")
    out = tmp_path / "out"
    manifest = convert.convert(str(src), str(out), skip_bad=True, val_cases=1, folds=0, **QUIET)
    assert len(manifest["cases"]) == 3 and bad_case not in {c["id"] for c in manifest["cases"]}
    report = json.load(open(out / "skipped.json"))
    assert [r["id"] for r in report] == [bad_case] and "_t1.nii.gz" in report[0]["error"]


def test_msd_layout_and_prediction_only_cases(raw_dir, tmp_path):
    """MSD Task01: 4D images (FLAIR, T1w, T1gd, T2w) and labels 1 oedema, 2 NCR, 3 ET."""
    msd = tmp_path / "Task01_BrainTumour"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (msd / d).mkdir(parents=True)
    brats = EDITIONS["2021"]
    names = sorted(os.listdir(raw_dir))[:3]
    originals = {}
    for i, name in enumerate(names):
        case_dir = os.path.join(raw_dir, name)
        files = brats.modality_files(case_dir)
        stack = np.stack([_read(files[m]) for m in ("flair", "t1", "t1ce", "t2")], axis=-1)
        affine = nib.load(files["t1"]).affine
        folder = "imagesTs" if i == 2 else "imagesTr"
        write_nifti_gz(nib.Nifti1Image(stack, affine), str(msd / folder / f"BRATS_{i:03d}.nii.gz"))
        seg = _read(brats.seg_file(case_dir))
        msd_seg = np.select([seg == 1, seg == 2, seg == 4], [2, 1, 3], 0).astype(np.uint8)
        originals[f"BRATS_{i:03d}"] = (seg, msd_seg)
        if i < 2:
            write_nifti_gz(nib.Nifti1Image(msd_seg, affine), str(msd / "labelsTr" / f"BRATS_{i:03d}.nii.gz"))
    out = tmp_path / "out"
    manifest = convert.convert(str(msd), str(out), val_cases=1, folds=0, **QUIET)
    assert manifest["edition"] == "msd"
    by_id = {c["id"]: c for c in manifest["cases"]}
    assert by_id["BRATS_002"]["has_label"] is False
    assert json.load(open(out / "splits.json"))["predict"] == ["BRATS_002"]
    for part in ("train", "val"):
        source = CaseSource(str(out), part)
        for i, meta in enumerate(source.cases):
            case = source[i]
            brats_seg, msd_seg = originals[meta["id"]]
            # internal labels equal the BraTS2021 file's, mapped; the inverse gives the MSD file back
            assert np.array_equal(to_original_grid(case["label"], meta, "2021"), brats_seg)
            assert np.array_equal(to_original_grid(case["label"], meta, "msd"), msd_seg)


def test_resampling_keeps_spacing_in_manifest_and_inverts_by_nearest(raw_dir, tmp_path):
    src, _ = _copy_cases(raw_dir, tmp_path, n=2)
    out = tmp_path / "out"
    manifest = convert.convert(str(src), str(out), target_spacing=(12.0, 12.0, 12.0), val_cases=1, folds=0, **QUIET)
    meta = manifest["cases"][0]
    crop = [hi - lo for lo, hi in meta["crop_box"]]
    expected = [max(1, round(n * s / 12.0)) for n, s in zip(crop, meta["spacing"])]
    assert meta["shape"] == expected and manifest["target_spacing"] == [12.0, 12.0, 12.0]


def test_rerun_skips_done_and_settings_change_is_refused(raw_dir, tmp_path):
    src, _ = _copy_cases(raw_dir, tmp_path, n=3)
    out = tmp_path / "out"
    first = convert.convert(str(src), str(out), cases_per_shard=1, val_cases=1, folds=0, **QUIET)
    mtimes = {n: os.path.getmtime(out / n) for n in first["shards"]}
    os.remove(out / "manifest.json")
    os.remove(out / first["shards"][1])  # as if killed before this shard was renamed
    logs = []
    again = convert.convert(str(src), str(out), cases_per_shard=1, val_cases=1, folds=0,
                            log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert again == first
    assert any("1 of 3" in line for line in logs)  # only the missing shard was redone
    assert os.path.getmtime(out / first["shards"][0]) == mtimes[first["shards"][0]]
    with pytest.raises(CaseError, match="other settings"):
        convert.convert(str(src), str(out), cases_per_shard=2, **QUIET)
    assert (out / "manifest.json").exists()  # an error removes only a folder its own run created


def test_fingerprint_follows_inputs_and_settings(raw_dir, tmp_path):
    src, case = _copy_cases(raw_dir, tmp_path, n=2)
    fp = lambda out, **kw: convert.convert(str(src), str(tmp_path / out), val_cases=1, folds=0, **kw, **QUIET)["fingerprint"]
    a = fp("a")
    assert fp("b", cases_per_shard=1) == a  # the shard layout is not part of the data
    assert fp("c", target_spacing=(8.0, 8.0, 8.0)) != a
    _rewrite(str(src / case / f"{case}_t2.nii.gz"), lambda x: x + 1)
    assert fp("d") != a


def test_killed_conversion_rerun_gives_the_same_shards(raw_dir, tmp_path):
    src, _ = _copy_cases(raw_dir, tmp_path, n=8)
    ref = tmp_path / "ref"
    convert.convert(str(src), str(ref), cases_per_shard=1, val_cases=2, folds=2, **QUIET)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.convert", "--src", str(src), "--out", str(out),
           "--cases-per-shard", "1", "--val-cases", "2", "--folds", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(n.endswith(".array_record") for n in os.listdir(out)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "conversion finished before it could be killed"
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    for name in sorted(os.listdir(ref)):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_killed_multiworker_conversion_takes_its_workers_along(raw_dir, tmp_path):
    src, _ = _copy_cases(raw_dir, tmp_path, n=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.convert", "--src", str(src), "--out", str(out),
           "--cases-per-shard", "1", "--val-cases", "2", "--folds", "2", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        # spawn's resource tracker is a child too; the workers are the ones writing shards
        workers = _children(proc.pid)
        if len(workers) >= 3 and out.exists() and any(".tmp" in n for n in os.listdir(out)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers, "no worker processes seen"
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "workers outlived the killed conversion"
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)  # the rerun, at once
    assert (out / "manifest.json").exists()
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_full_disk_leaves_no_temporary_shard(raw_dir, tmp_path, monkeypatch):
    from array_record.python import array_record_module

    src, _ = _copy_cases(raw_dir, tmp_path, n=2)
    real = array_record_module.ArrayRecordWriter

    class FullDisk:  # what ENOSPC looks like: the write fails, and so does the close after it
        def __init__(self, path, options):
            self.writer = real(path, options)

        def write(self, record):
            raise OSError(28, "No space left on device")

        def close(self):
            self.writer.close()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        convert.convert(str(src), str(out), cases_per_shard=1, val_cases=1, folds=0, **QUIET)
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.endswith(".array_record")]
