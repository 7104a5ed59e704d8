import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_prep import convert, synthetic
from segguided_jax.data.brats import EDITIONS, MODALITIES, labels_to_regions, regions_to_labels
from segguided_jax.data.pipeline import train_dataset
from segguided_jax.data.records import CaseSource, load_manifest, to_original_grid

SHAPE = (40, 40, 26)


def _read(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_synthetic_same_seed_same_bytes_and_layout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        synthetic.write_case(str(out), "2023", 7, seed=11, shape=SHAPE)
    case = "BraTS-GLI-00007-000"
    names = sorted(os.listdir(a / case))
    assert names == sorted(f"{case}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg"))
    for n in names:
        assert (a / case / n).read_bytes() == (b / case / n).read_bytes()
    synthetic.write_case(str(tmp_path / "c"), "2023", 7, seed=12, shape=SHAPE)
    assert (tmp_path / "c" / case / f"{case}-t1c.nii.gz").read_bytes() != (a / case / f"{case}-t1c.nii.gz").read_bytes()


def test_synthetic_anatomy_follows_brats(raw_dir):
    edition = EDITIONS["2021"]
    cases = sorted(os.listdir(raw_dir))
    without_et = 0
    for case in cases:
        d = os.path.join(raw_dir, case)
        seg = _read(edition.seg_file(d))
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert (seg > 0).any()
        files = edition.modality_files(d)
        imgs = {m: _read(files[m]).astype(np.float32) for m in MODALITIES}
        brain = imgs["t1"] != 0
        assert (seg[~brain] == 0).all()  # tumour lies inside the skull-stripped brain
        wm_like = brain & (seg == 0)
        if (seg == 4).any():
            # ET enhances on T1ce relative to the necrotic core and normal tissue.
            assert imgs["t1ce"][seg == 4].mean() > imgs["t1ce"][wm_like].mean()
            if (seg == 1).any():
                assert imgs["t1ce"][seg == 4].mean() > 1.5 * imgs["t1ce"][seg == 1].mean()
        else:
            without_et += 1
        # Oedema is bright on FLAIR.
        assert imgs["flair"][seg == 2].mean() > 1.3 * imgs["flair"][wm_like].mean()
    assert 0 < without_et < len(cases)


def test_conversion_round_trip_is_exact(raw_dir, data_dir):
    manifest = load_manifest(data_dir)
    assert manifest["edition"] == "2021" and len(manifest["cases"]) == 8
    assert {c["split"] for c in manifest["cases"]} == {"train", "val"}
    for split in ("train", "val"):
        source = CaseSource(data_dir, split)
        for i, meta in enumerate(source.cases):
            case = source[i]
            assert case["case_id"] == meta["id"]
            seg_path = EDITIONS["2021"].seg_file(os.path.join(raw_dir, meta["id"]))
            original = _read(seg_path)
            restored = to_original_grid(case["label"], meta, "2021")
            assert restored.dtype == np.uint8 and np.array_equal(restored, original)
            # z-scored inside the brain, zero outside
            t1 = _read(EDITIONS["2021"].modality_files(os.path.join(raw_dir, meta["id"]))["t1"])
            box = tuple(slice(a, b) for a, b in meta["crop_box"])
            brain = t1[box] != 0
            assert np.allclose(case["image"][..., 0][brain].mean(), 0, atol=1e-4)
            assert np.allclose(case["image"][..., 0][brain].std(), 1, atol=1e-3)
            assert (case["image"][~brain] == 0).all()
            assert np.asarray(meta["affine"]) == pytest.approx(nib.load(seg_path).affine)


def test_split_is_deterministic_from_seed():
    ids = [f"c{i}" for i in range(20)]
    a = convert.split_cases(ids, 0.25, seed=5)
    assert a == convert.split_cases(ids, 0.25, seed=5)
    assert sum(v == "val" for v in a.values()) == 5
    assert a != convert.split_cases(ids, 0.25, seed=6)


def test_region_label_conversions_are_inverse():
    labels = np.array([0, 1, 2, 3], np.uint8)
    regions = labels_to_regions(labels)
    assert regions.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert regions_to_labels(regions).tolist() == [0, 1, 2, 3]


# --- bad input: each stops with the case and file named, and leaves nothing in --out ---

def _copy_case(raw_dir, tmp_path, n=2):
    src = tmp_path / "src"
    for case in sorted(os.listdir(raw_dir))[:n]:
        shutil.copytree(os.path.join(raw_dir, case), src / case)
    return src, sorted(os.listdir(src))[-1]


def _damage_missing(path):
    os.remove(path)


def _damage_truncated(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _damage_shape(path):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-2], img.affine), path)


def _damage_label(path):
    img = nib.load(path)
    seg = np.asanyarray(img.dataobj).copy()
    seg[seg.shape[0] // 2, seg.shape[1] // 2, seg.shape[2] // 2] = 3  # 3 is not a BraTS2021 label
    nib.save(nib.Nifti1Image(seg, img.affine), path)


@pytest.mark.parametrize("damage, file_suffix, message", [
    (_damage_missing, "t2", "missing file"),
    (_damage_truncated, "flair", "cannot read"),
    (_damage_shape, "t1ce", "has shape"),
    (_damage_label, "seg", "label value(s) [3]"),
])
def test_bad_input_names_case_and_file_and_leaves_nothing(raw_dir, tmp_path, damage, file_suffix, message):
    src, bad_case = _copy_case(raw_dir, tmp_path)
    bad_file = str(src / bad_case / f"{bad_case}_{file_suffix}.nii.gz")
    damage(bad_file)
    out = tmp_path / "out"
    with pytest.raises(convert.CaseError) as err:
        convert.convert(str(src), str(out), cases_per_shard=1, log=lambda *a, **k: None)
    text = str(err.value)
    assert bad_case in text and bad_file in text and message in text
    assert os.listdir(out) == []  # no shard, no manifest, no staging folder


def test_convert_cli_exits_with_message(raw_dir, tmp_path, capsys):
    src, bad_case = _copy_case(raw_dir, tmp_path, n=1)
    os.remove(src / bad_case / f"{bad_case}_seg.nii.gz")
    os.remove(src / bad_case / f"{bad_case}_t1.nii.gz")
    with pytest.raises(SystemExit) as e:
        convert.main(["--src", str(src), "--out", str(tmp_path / "o")])
    assert bad_case in str(e.value) and "_t1.nii.gz" in str(e.value)


# --- the Grain pipeline ---

def test_pipeline_batches_and_resumes_exactly(tiny_config):
    cfg = tiny_config
    ds = train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    b = first[0]
    assert b["image"].shape == (2, 16, 16, 16, 4) and b["image"].dtype == np.float32
    assert b["label"].shape == (2, 16, 16, 16) and b["label"].dtype == np.uint8
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    it2 = iter(train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2))
    it2.set_state(json.loads(json.dumps(state)))  # the state survives JSON, as in a checkpoint
    for e in expected:
        got = next(it2)
        assert np.array_equal(got["image"], e["image"]) and np.array_equal(got["label"], e["label"])
    other = next(iter(train_dataset(cfg.data.dir, cfg.data, seed=1, batch_size=2)))
    assert not np.array_equal(other["image"], first[0]["image"])


def test_foreground_fraction_one_always_hits_tumour(tiny_config):
    cfg = tiny_config
    cfg.data.foreground_fraction = 1.0
    it = iter(train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2))
    for _ in range(4):
        assert all((lab > 0).any() for lab in next(it)["label"])
