import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_prep import synthetic
from segguided_jax.data.brats import EDITIONS, MODALITIES, labels_to_regions, regions_to_labels
from segguided_jax.data.pipeline import train_dataset

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


def test_region_label_conversions_are_inverse():
    labels = np.array([0, 1, 2, 3], np.uint8)
    regions = labels_to_regions(labels)
    assert regions.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert regions_to_labels(regions).tolist() == [0, 1, 2, 3]
