"""The exported model: `segguided_jax.export` writes it, `predict --model` reads it without the
training stack and predicts exactly what `predict --workdir` does; bad model files are refused
before anything is written. Also the package's own XLA flags (segguided_jax.runtime)."""
import io
import json
import os
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

from segguided_jax import runtime
from segguided_jax.inference import export, model_artefact, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "BraTS2021_00000"


@pytest.fixture(scope="module")
def model_file(tiny_run, tmp_path_factory):
    """The model file of tiny_run, written by the export command as users run it."""
    out = str(tmp_path_factory.mktemp("export") / "tiny.sgm")
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    run = subprocess.run([sys.executable, "-m", "segguided_jax.export", "--workdir", tiny_run, "--out", out],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_model_file_holds_function_parameters_and_what_predict_needs(model_file, tiny_run, data_dir):
    model = model_artefact.load(model_file)
    meta = model.metadata
    assert tuple(model.exported.platforms) == ("cpu", "cuda", "tpu")
    assert meta["format_version"] == model_artefact.FORMAT_VERSION
    assert meta["params"]["sha256"] == model_artefact.params_sha256(model.params)
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    assert meta["data_fingerprint"] == manifest["fingerprint"]
    assert meta["spacing"]["median"] == pytest.approx(np.median([c["spacing"] for c in manifest["cases"]], 0))
    assert meta["postprocessing"]["learned"] == json.load(open(os.path.join(tiny_run, "postprocessing.json")))
    assert meta["labels"]["2021"]["ET"] == 4 and meta["labels"]["2023"]["ET"] == 3
    assert meta["inference"]["window"] == [16, 16, 16] and meta["output"]["attention_stages"] == 2
    # The window batch is symbolic: any number of windows goes through the same function.
    x = np.random.default_rng(0).standard_normal((3, 16, 16, 16, 4)).astype(np.float32)
    probabilities, (coarse, fine) = model.forward(model.params, x)
    assert probabilities.shape == (3, 16, 16, 16, 3) and fine.shape == (3, 16, 16, 16, 3)
    assert coarse.shape == (3, 8, 8, 8, 3)


def test_trained_model_from_the_run_and_from_its_file_agree(model_file, tiny_run, data_dir):
    """One object from either source: the same predictor settings, training voxel size,
    post-processing and predictions (bit for bit on one CPU device)."""
    from segguided_jax.data.records import CaseSource
    from segguided_jax.inference.postprocess import PostProcessing
    from segguided_jax.inference.trained_model import PredictorSettings, TrainedModel

    run, file = TrainedModel.from_checkpoint(tiny_run), TrainedModel.from_file(model_file)
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    learned = json.load(open(os.path.join(tiny_run, "postprocessing.json")))
    for model in (run, file):
        # tiny.py: 16³ windows, 4 per batch, overlap 0.5 (synthetic.py); predict mirrors 8 ways and
        # writes the finest of its 2 decoder stages' maps.
        assert model.defaults == PredictorSettings(window=(16, 16, 16), overlap=0.5, batch_size=4,
                                                   mirror_axes=(0, 1, 2), attention_stages=(-1,))
        assert model.spacing.manifest == os.path.join(data_dir, "manifest.json")
        assert model.spacing.target is None and model.spacing.voxel_size == pytest.approx(
            np.median([c["spacing"] for c in manifest["cases"]], 0))
        assert model.learned == learned and model.step == 2
        assert model.postprocessing() == PostProcessing(threshold=0.5, et_rule="component", min_et_voxels=10,
                                                        min_volume_mm3=learned["min_volume_mm3"])
    assert run.spacing == file.spacing and run.config.to_dict() == file.config.to_dict()
    assert not run.fixed_window and file.fixed_window and file.metadata["params"]["count"] > 0
    assert run.predictor_settings(window=(32, 32, 32)).window == (32, 32, 32)
    with pytest.raises(ValueError, match=r"was exported for windows of \[16, 16, 16\] voxels"):
        file.predictor_settings(window=(32, 32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        run.predictor_settings(window=(18, 16, 16))
    with pytest.raises(ValueError, match="2 decoder stages"):
        run.predictor_settings(attention_stages=(2,))
    image = CaseSource(data_dir, "test")[0]["image"]
    np.testing.assert_array_equal(run.predictor()(image), file.predictor()(image))
    one_pass = run.predictor_settings(mirror_axes=(), attention_stages=(0, 1))
    assert one_pass == file.predictor_settings(mirror_axes=(), attention_stages=(0, 1))
    plain = run.predictor(one_pass)(image)
    assert plain.shape == (*image.shape[:3], 6)
    np.testing.assert_array_equal(plain, file.predictor(one_pass)(image))


# Runs predict --model in a fresh interpreter and reports which top-level modules it imported.
_FRESH_PREDICT = """
import json, sys
from segguided_jax.inference import predict
rc = predict.main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_predict_model_needs_no_training_stack_and_equals_predict_workdir(model_file, tiny_run, raw_dir, tmp_path):
    case_dir = os.path.join(raw_dir, CASE)
    out_model, out_workdir = str(tmp_path / "model"), str(tmp_path / "workdir")
    run = subprocess.run([sys.executable, "-c", _FRESH_PREDICT, "--model", model_file, "--input", case_dir,
                          "--out", out_model, "--probabilities", "--no-panels"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    assert not {"flax", "optax", "orbax", "grain", "array_record"} & set(report["modules"])
    assert predict.main(["--workdir", tiny_run, "--input", case_dir, "--out", out_workdir, "--probabilities",
                         "--no-panels"]) == 0
    names = sorted(os.listdir(out_workdir))
    assert names == sorted(os.listdir(out_model)) and f"{CASE}_probabilities.nii.gz" in names
    for name in names:  # probabilities, attention maps and labels, bit for bit (one CPU device)
        a, b = (np.asanyarray(nib.load(os.path.join(d, name)).dataobj) for d in (out_model, out_workdir))
        np.testing.assert_array_equal(a, b, err_msg=name)


def _rewrite(src, dst, metadata=None, member=None, data=None):
    """A copy of model file src with its metadata changed by `metadata(dict)` or one member replaced."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            content = z.read(info)
            if info.filename == "metadata.json" and metadata:
                m = json.loads(content)
                metadata(m)
                content = json.dumps(m)
            if info.filename == member:
                content = data
            out.writestr(info.filename, content)
    return str(dst)


def _other_batch(m):
    m["inference"]["batch_size"] = 7  # the config says 4


def _bump_version(m):
    m["format_version"] += 1


def _other_window(m):
    m["inference"]["window"] = [32, 32, 32]
    m["config"]["eval"]["window"] = [32, 32, 32]


def test_bad_model_files_are_refused_before_anything_is_written(model_file, tiny_run, raw_dir, tmp_path, capsys):
    data = open(model_file, "rb").read()
    (tmp_path / "truncated.sgm").write_bytes(data[: len(data) // 2])
    npy = io.BytesIO()
    first = np.load(io.BytesIO(zipfile.ZipFile(model_file).read("params/0000.npy")))
    np.save(npy, first + 1)
    tpu_only = str(tmp_path / "tpu_only.sgm")
    assert export.main(["--workdir", tiny_run, "--out", tpu_only, "--platforms", "tpu", "cuda"]) == 0
    bad = {
        str(tmp_path / "truncated.sgm"): "truncated or damaged",
        _rewrite(model_file, tmp_path / "newer.sgm", metadata=_bump_version): "is newer than this segguided_jax reads",
        tpu_only: "exported for tpu, cuda, not for this machine's platform cpu",
        _rewrite(model_file, tmp_path / "window.sgm", metadata=_other_window): "the metadata says (batch, [32, 32, 32], 4)",
        _rewrite(model_file, tmp_path / "batch.sgm", metadata=_other_batch): "inference settings {'window': [16, 16, 16], "
            "'overlap': 0.5, 'batch_size': 7, 'mirror_axes': [0, 1, 2], 'attention_stages': [-1]} differ from the ones "
            "its config gives",
        _rewrite(model_file, tmp_path / "params.sgm", member="params/0000.npy", data=npy.getvalue()):
            "sha256 differs from the one in the metadata",
        str(tmp_path / "missing.sgm"): "no such model file",
    }
    for path, fault in bad.items():
        out = tmp_path / ("out_" + os.path.basename(path))
        assert predict.main(["--model", path, "--input", os.path.join(raw_dir, CASE), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: " in err and fault in err, err
        assert not out.exists()


def test_package_applies_its_cpu_flags_and_a_users_own_win(monkeypatch):
    fast = runtime.cpu_flags({}, machine="x86_64", jax_version="0.12.0")
    assert fast == (runtime.ONEDNN, runtime.ONEDNN_CUSTOM_CALL)
    assert runtime.cpu_flags({"SEGGUIDED_CPU_FLAGS": "cacheable"}, "x86_64", "0.12.0") == (runtime.ONEDNN,)
    assert runtime.cpu_flags({"XLA_FLAGS": "--xla_cpu_use_onednn=false"}, "x86_64", "0.12.0") == ()
    assert runtime.cpu_flags({}, "x86_64", "0.10.2") == () and runtime.cpu_flags({}, "aarch64", "0.12.0") == ()
    with pytest.raises(ValueError, match="SEGGUIDED_CPU_FLAGS"):
        runtime.cpu_flags({"SEGGUIDED_CPU_FLAGS": "quick"}, "x86_64", "0.12.0")
    # Through the import every entry point does, in a fresh interpreter, before JAX starts.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SEGGUIDED_CPU_FLAGS")}
    code = "import os, segguided_jax.predict; print(os.environ.get('XLA_FLAGS', ''))"
    flags = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, XLA_FLAGS="--xla_dump_to=/tmp/x"),
                           capture_output=True, text=True, check=True).stdout.split()
    assert flags == ["--xla_dump_to=/tmp/x", *runtime.cpu_flags({})]
    own = "--xla_cpu_use_onednn=false"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, XLA_FLAGS=own), capture_output=True,
                          text=True, check=True).stdout.split() == [own]


def test_sweep_evaluates_a_model_file_as_it_evaluates_the_run(model_file, tiny_run, tmp_path):
    import importlib.util

    from segguided_jax.experiments import sweep

    spec = importlib.util.spec_from_file_location("launch_sweep", os.path.join(ROOT, "launch", "sweep.py"))
    launch_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_sweep)
    launch_sweep.main(["--config=configs/tiny.py", f"--root={tmp_path}", f"--evaluate-run={tiny_run}",
                       f"--model={model_file}"])
    from_checkpoint = sweep.evaluate_run(tiny_run, str(tmp_path / "checkpoint"))
    rows = open(os.path.join(tiny_run, sweep.EVAL_DIR, "per_case.csv")).read()
    assert rows == open(from_checkpoint).read() and rows.count("\n") == 3  # header + the two test cases
