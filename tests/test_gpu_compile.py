"""Deviceless GPU compiles (JAX's CUDA plugin, no GPU): the census counts what it should on
programs whose figures are known, and `compile_check --gpu` compiles the tiny config's train and
predict steps for one and for two H100s through the mesh and step that train runs."""
import json
import os
import re
import subprocess
import sys

import pytest

from segguided_jax.compilation.gpu_compile import cuda_unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(cuda_unavailable() is not None, reason=f"{cuda_unavailable()}")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT)


def test_census_counts_the_flops_bytes_and_all_reduce_of_known_programs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_census_checks.py")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    conv = r["conv"]
    assert conv["count"]["cuDNN conv forward"] == 1 and conv["count"]["cuDNN conv backward-filter"] == 1, conv
    assert "cuDNN conv backward-input" not in conv["count"]  # x is not differentiated
    assert conv["flops"] == conv["expected_flops"]
    assert conv["all_reduce_bytes"] == conv["expected_all_reduce_bytes"]
    dot = r["dot"]
    assert dot["count"] == {"Triton fusion": 1}, dot  # no autotuning without a GPU: a Triton GEMM
    assert dot["flops"] == dot["expected_flops"]
    assert dot["bytes_accessed"] == dot["expected_bytes"]


def _rows(stdout):
    """{(topology, step): cells} of compile_check's GPU table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 15 and cells[0] == "h100":
            rows[(cells[1], cells[4])] = cells
    return rows


def _compile_check(*flags):
    out = subprocess.run([sys.executable, "-m", "segguided_jax.compile_check", "--config=configs/tiny.py", "--gpu=h100",
                          "--gpu_topology=1x1x2", *flags], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout)
    return out.stdout


# The H100 cut down to 3.5 MiB (as a MIG slice is): the tiny train step's largest batch per GPU is
# then 2, found with one more compile (3), where 80 GB would take a dozen compiles of batches in the
# hundreds; the comparisons below run under the same memory.
MEMORY = "--gpu_memory_gib=0.0035"


@pytest.fixture(scope="module")
def two_h100s(tmp_path_factory):
    """compile_check's output for the tiny config on one host of two H100s of 3.5 MiB, train and
    predict, with --max_batch (the optimised programs written to an --hlo_dir beside it)."""
    hlo = tmp_path_factory.mktemp("hlo")
    stdout = _compile_check(f"--hlo_dir={hlo}", "--max_batch", MEMORY)
    written = sorted(os.listdir(hlo))
    assert written == ["h100_1x1x2_predict_b4.hlo.txt", "h100_1x1x2_train_b2.hlo.txt"], written  # not the search's
    assert all("ENTRY" in (hlo / n).read_text() for n in written)
    return stdout


def _census(stdout, step):
    return re.search(rf"1x1x2 {step} census \(.*?\): (.*)", stdout).group(1)


def test_compile_check_gpu_compiles_tiny_for_two_h100s(two_h100s):
    """Through the command, on one host of two H100s: the train step all-reduces every float32
    gradient once (the tiny config computes in float32), predict's window step (each GPU its own
    windows, the parameters replicated) reduces nothing; each fits where its peak is within the
    card's memory (--gpu_memory_gib: the train step's batch of 2 does, predict's 4 windows do not),
    and --max_batch finds the largest train batch that fits by compiling both sides of it."""
    from configs import tiny
    from segguided_jax.models.network import abstract_model, parameter_count

    rows = _rows(two_h100s)
    assert set(rows) == {("1x1x2", "train"), ("1x1x2", "predict")}, two_h100s
    train, predict = rows[("1x1x2", "train")], rows[("1x1x2", "predict")]
    assert train[2] == "2 (1)" and train[3] == "2×1" and train[5] == str(tiny.get_config().train.batch_size)
    for row in (train, predict):  # "PEAK of MEMORY (TEMPORARIES)"
        peak, memory = (float(v) for v in row[6].split(" (")[0].split(" of "))
        assert memory == 0.0035 and row[7] == ("yes" if peak <= memory else "no"), row
    assert train[7] == "yes" and predict[7] == "no"
    assert "1x1x2: largest train batch per GPU that fits: 2 (compiled: 2 fits, 3 does not fit)" in two_h100s
    grads = 4 * parameter_count(abstract_model(tiny.get_config().model))
    reduced = float(train[10].split()[0]) * 2**20
    assert grads <= reduced <= grads + 4096, (grads, train[10])  # the gradients and a few scalars
    assert predict[10] == "0"
    assert float(train[8].split()[0]) > 0 and float(predict[8].split()[0]) > 0  # FLOPs counted
    census = _census(two_h100s, "train")
    for kind in ("cuDNN conv forward", "cuDNN conv backward-input", "cuDNN conv backward-filter"):
        assert re.search(rf"{kind} \d+", census), census
    assert re.search(r"all-reduce \d+", census) and "all-reduce" not in _census(two_h100s, "predict")


def test_channels_last_gpu_convolutions_take_the_transposes_out_through_the_config(two_h100s):
    """model.gpu_conv_layout reaches the compiled GPU train step: channels-last convolutions leave
    fewer transposes, writing fewer bytes, than XLA's default channels-first layout (the tiny
    config; brats21's figures are in docs/gpu.md)."""
    def transposes(stdout):
        m = re.search(r"transpose fusion (\d+) \((\d+) MiB", _census(stdout, "train"))
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    default = transposes(two_h100s)
    channels_last = transposes(_compile_check("--no_predict", MEMORY, "--config.model.gpu_conv_layout=channels_last"))
    print(f"transpose fusions (count, MiB written): default {default}, channels_last {channels_last}")
    assert channels_last[0] < default[0] and channels_last[1] < default[1]
