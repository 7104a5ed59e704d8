"""The predict CLI end to end on tiny synthetic cases, with a tiny checkpoint trained once.

`predict.main(argv)` returns the exit status (0 all ok, 1 a case failed) instead of exiting; one
test runs `python -m segguided_jax.predict`, as users do, and reads the status the shell sees.
"""
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep import synthetic
from segguided_jax.evaluation import evaluate
from segguided_jax.inference import predict
from segguided_jax.data.brats import EDITIONS
from segguided_jax.data import cases as cases_lib
from segguided_jax.data.preprocess import to_original_grid
from segguided_jax.inference.panels import VIEWS, displayed, orientation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUBS = ("NCR", "ED", "ET")


@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


def _case_files(case_dir):
    case_id = os.path.basename(case_dir)
    return {m: os.path.join(case_dir, f"{case_id}_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair", "seg")}


def _brain_box(case_dir):
    files = _case_files(case_dir)
    brain = np.any([np.asanyarray(nib.load(files[m]).dataobj) != 0 for m in ("t1", "t1ce", "t2", "flair")], axis=0)
    nz = np.argwhere(brain)
    return tuple(slice(lo, hi + 1) for lo, hi in zip(nz.min(0), nz.max(0)))


def _assert_same_grid(out_path, ref_path, dtype):
    out, ref = nib.load(out_path), nib.load(ref_path)
    assert out.shape[:3] == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert out.get_data_dtype() == np.dtype(dtype)
    for field in ("qform_code", "sform_code", "xyzt_units"):
        assert int(out.header[field]) == int(ref.header[field]), field
    np.testing.assert_array_equal(out.header.get_zooms()[:3], ref.header.get_zooms()[:3])
    np.testing.assert_array_equal(out.header.get_qform(), ref.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), ref.header.get_sform())
    return np.asanyarray(out.dataobj)


def test_case_folder(workdir, raw_dir, tmp_path):
    case_dir = os.path.join(raw_dir, "BraTS2021_00000")
    out = str(tmp_path / "out")
    assert predict.main(["--workdir", workdir, "--input", case_dir, "--out", out, "--probabilities"]) == 0
    t1 = _case_files(case_dir)["t1"]
    stem = os.path.join(out, "BraTS2021_00000")
    labels = _assert_same_grid(stem + ".nii.gz", t1, np.uint8)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    box = _brain_box(case_dir)
    outside = np.ones(labels.shape, bool)
    outside[box] = False
    assert not labels[outside].any()
    for sub in SUBS:
        att = _assert_same_grid(f"{stem}_attention_{sub}.nii.gz", t1, np.float32)
        assert att.min() >= 0 and att.max() <= 1
        assert not att[outside].any()
        assert att[box].max() > 0  # the sigmoid maps are never exactly zero inside
    probs = nib.load(f"{stem}_probabilities.nii.gz")
    assert probs.shape == labels.shape + (3,) and probs.get_data_dtype() == np.float32
    np.testing.assert_array_equal(probs.affine, nib.load(t1).affine)
    with open(f"{stem}_panel.png", "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    assert int.from_bytes(head[16:20], "big") > 200 and int.from_bytes(head[20:24], "big") > 200
    found = evaluate.find_predictions(out)["BraTS2021_00000"]  # the names evaluate reads
    assert found["seg"] == stem + ".nii.gz" and sorted(found["attention"]) == sorted(SUBS)
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_damaged_case_is_reported_and_others_run(workdir, raw_dir, tmp_path):
    """As users run it (python -m): the exit status says a case failed."""
    src = tmp_path / "cases"
    for i in (1, 2, 3):
        shutil.copytree(os.path.join(raw_dir, f"BraTS2021_{i:05d}"), src / f"BraTS2021_{i:05d}")
    flair = _case_files(str(src / "BraTS2021_00002"))["flair"]
    with open(flair, "rb") as f:
        data = f.read()
    with open(flair, "wb") as f:
        f.write(data[: len(data) // 2])  # a truncated download
    out = str(tmp_path / "out")
    # One pass per case (--no-tta) here and below where mirroring is not what is tested: it is in
    # test_case_folder, test_tta_and_explicit_files and the sweep/validation identity test.
    run = subprocess.run([sys.executable, "-m", "segguided_jax.predict", "--workdir", workdir, "--input", str(src),
                          "--out", out, "--no-panels", "--no-tta"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "BraTS2021_00001.nii.gz"))
    assert os.path.exists(os.path.join(out, "BraTS2021_00003.nii.gz"))
    assert not [n for n in os.listdir(out) if n.startswith("BraTS2021_00002")]
    assert "BraTS2021_00002" in run.stderr and flair in run.stderr
    assert "2 ok, 1 failed" in run.stdout


def test_full_disk_while_writing_leaves_no_partial_case(workdir, raw_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = os.replace

    def replace(src, dst):  # the label map, the last file of a case, hits a full disk
        if str(dst).endswith("BraTS2021_00001.nii.gz"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)  # storage writes each file through os.replace
    args = ["--workdir", workdir, "--out", str(out), "--no-tta", "--probabilities", "--input"]
    assert predict.main(args + [os.path.join(raw_dir, f"BraTS2021_{i:05d}") for i in (1, 3)]) == 1
    assert "No space left" in capsys.readouterr().err
    names = os.listdir(out)
    assert not [n for n in names if n.startswith("BraTS2021_00001") or ".tmp" in n]  # nothing half-written
    assert "BraTS2021_00003.nii.gz" in names and "BraTS2021_00003_attention_ET.nii.gz" in names


def test_tta_and_explicit_files(workdir, raw_dir, tmp_path, capsys):
    files = _case_files(os.path.join(raw_dir, "BraTS2021_00004"))
    out = str(tmp_path / "out")
    args = ["--workdir", workdir, "--out", out, "--no-panels", "--no-attention"]
    args += [a for m in ("t1", "t1ce", "t2", "flair") for a in (f"--{m}", files[m])]
    assert predict.main(args) == 0
    assert "(8 passes)" in capsys.readouterr().out  # mirroring is the default, as in nnU-Net
    labels = _assert_same_grid(os.path.join(out, "BraTS2021_00004.nii.gz"), files["t1"], np.uint8)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    assert not [n for n in os.listdir(out) if "attention" in n]
    # Threshold 0: every region everywhere in the brain box, so every voxel there is ET = 4.
    assert predict.main(args + ["--no-tta", "--threshold", "0", "--case-id", "mine"]) == 0
    assert "(1 passes)" in capsys.readouterr().out
    labels = _assert_same_grid(os.path.join(out, "mine.nii.gz"), files["t1"], np.uint8)
    assert set(np.unique(labels).tolist()) == {0, 4}


def test_2023_writes_et_as_3(workdir, tmp_path):
    case_dir = synthetic.write_case(str(tmp_path / "raw"), "2023", 0, seed=5, shape=(40, 40, 26))
    out = str(tmp_path / "out")
    assert predict.main(["--workdir", workdir, "--input", case_dir, "--out", out, "--threshold", "0",
                         "--min-et-voxels", "3", "--no-tta"]) == 0
    case_id = os.path.basename(case_dir)
    t1 = os.path.join(case_dir, EDITIONS["2023"].file_name(case_id, "t1n"))
    labels = _assert_same_grid(os.path.join(out, f"{case_id}.nii.gz"), t1, np.uint8)
    assert set(np.unique(labels).tolist()) == {0, 3}
    assert os.path.exists(os.path.join(out, f"{case_id}_attention_ET.nii.gz"))
    assert os.path.exists(os.path.join(out, f"{case_id}_panel.png"))


def test_case_id_from_file():
    assert cases_lib.case_id_from_file("/x/BraTS2021_00007_t1.nii.gz") == "BraTS2021_00007"
    assert cases_lib.case_id_from_file("BraTS-GLI-00001-000-t1n.nii.gz") == "BraTS-GLI-00001-000"
    assert cases_lib.case_id_from_file("patient.nii") == "patient"


def test_to_original_grid_resamples_back():
    meta = {"orig_shape": [10, 12, 8], "crop_box": [[2, 8], [1, 11], [0, 8]], "shape": [3, 5, 4]}
    out = to_original_grid(np.full((3, 5, 4, 2), 0.5, np.float32), meta)
    assert out.shape == (10, 12, 8, 2) and out.dtype == np.float32
    assert np.allclose(out[2:8, 1:11, :], 0.5) and out.sum() == pytest.approx(0.5 * 6 * 10 * 8 * 2)
    labels = to_original_grid(np.full((3, 5, 4), 2, np.uint8), meta)  # labels: nearest, dtype kept
    assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) == {0, 2} and (labels[2:8, 1:11] == 2).all()


def test_panel_orientation_is_radiological():
    # BraTS's LPS voxel order: i grows to the patient's left, j to posterior.
    affine = synthetic.brats_affine((20, 20, 10), (1.0, 1.0, 1.0))
    vol = np.zeros((20, 20, 10))
    vol[2, 2, 5] = 1  # right, anterior
    from nibabel.orientations import apply_orientation

    ras = apply_orientation(vol, orientation(affine))
    name, axis, letters, _ = VIEWS[0]
    assert name == "axial" and letters[0] == "A" and letters[2] == "R"
    shown = displayed(ras[:, :, 5])
    r, c = np.argwhere(shown)[0]
    assert r < 10 and c < 10  # anterior up, the patient's right on the image's left


def test_other_voxel_size_warns_and_spacing_train_resamples(workdir, tmp_path, capsys):
    # 4 mm voxels where the tiny model trained on 6 mm ones.
    case_dir = synthetic.write_case(str(tmp_path / "raw"), "2021", 0, seed=7, shape=(60, 60, 39))
    args = ["--workdir", workdir, "--input", case_dir, "--no-panels", "--no-tta"]
    assert predict.main(args + ["--out", str(tmp_path / "native"), "--spacing", "none"]) == 0
    assert "but the model was trained at 6 x 6 x 5.96" in capsys.readouterr().err
    out = str(tmp_path / "resampled")
    assert predict.main(args + ["--out", out]) == 0  # by default: resampled to the training spacing
    assert "warning" not in capsys.readouterr().err
    t1 = _case_files(case_dir)["t1"]
    labels = _assert_same_grid(os.path.join(out, "BraTS2021_00000.nii.gz"), t1, np.uint8)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    outside = np.ones(labels.shape, bool)
    outside[_brain_box(case_dir)] = False
    att = _assert_same_grid(os.path.join(out, "BraTS2021_00000_attention_ED.nii.gz"), t1, np.float32)
    assert att.min() >= 0 and att.max() <= 1 and not att[outside].any() and not labels[outside].any()


def test_validation_sweep_and_predict_give_identical_probabilities(workdir, data_dir, raw_dir, tmp_path,
                                                                   monkeypatch):
    """One code path: the probabilities of a case are the same whether validation, the sweep's
    test evaluation or the predict CLI computes them."""
    import json

    import jax

    from segguided_jax.experiments import sweep
    from segguided_jax.parallel import sharding
    from segguided_jax.inference.checkpoint_reader import load_checkpoint_params
    from segguided_jax.data.records import CaseSource
    from segguided_jax.inference.predictor import VolumePredictor
    from segguided_jax.training.loop import Validator

    config, graphdef, params = load_checkpoint_params(workdir)[:3]
    case_id = json.load(open(os.path.join(data_dir, "splits.json")))["holdout"]["test"][0]
    source = CaseSource(data_dir, "test")
    index = [c["id"] for c in source.cases].index(case_id)
    meta, image = source.cases[index], source[index]["image"]

    seen = {}  # what the sweep's evaluation computes, case by case
    call = VolumePredictor.__call__
    monkeypatch.setattr(VolumePredictor, "__call__",
                        lambda self, img: seen.setdefault(len(seen), (self.mirror_axes, call(self, img)))[1])
    sweep.evaluate_run(workdir, str(tmp_path / "sweep"))
    monkeypatch.undo()
    mirror_axes, mirrored = seen[index]  # the sweep predicts the test cases in this order
    assert mirror_axes == (0, 1, 2)
    validation = Validator(config, graphdef, params, sharding.make_mesh()).predictor(image)

    def predicted(extra):
        out = str(tmp_path / ("tta" if not extra else "plain"))
        assert predict.main(["--workdir", workdir, "--input", os.path.join(raw_dir, case_id), "--out", out,
                             "--probabilities", "--no-panels", *extra]) == 0
        return np.asanyarray(nib.load(os.path.join(out, f"{case_id}_probabilities.nii.gz")).dataobj)

    assert jax.device_count() == 1
    np.testing.assert_array_equal(predicted(["--no-tta"]), to_original_grid(validation[..., :3], meta))
    np.testing.assert_array_equal(predicted([]), to_original_grid(mirrored[..., :3], meta))
