"""models.formulations: each backend's formulation computes the plain network's values.

The two value tests run brats21's kinds of stage at 16³ (3³ strided downsampling, resize
upsampling, gates) with widths (8, 16, 32), the ones test_tpu_compile.py compiles for TPU, and
compare each program with one float64 reference of the plain network (the `reference` fixture,
computed once for both)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from segguided_jax.models import formulations
from segguided_jax.models.formulations import Formulation, fold_factor
from segguided_jax.models.network import abstract_model, build_model

WIDTHS = (8, 16, 32)
PATCH = 16
BATCH = 2
SMOOTH_KINK = 10.0  # sharpness of _smooth_leaky_relu's rounded kink (its width is about 1/10)


def _model_config(compute_dtype):
    config = tiny.get_config().model
    config.widths = WIDTHS
    config.down_kernel = 3
    config.upsample = "resize"
    config.compute_dtype = compute_dtype
    return config


PLAIN = Formulation()  # on this CPU: the blocks as written (with the CPU rewrites)


def _graphdef(compute_dtype, formulation=PLAIN):
    # The parameters are float32 whatever the compute dtype, so every program takes the same ones
    # (the reference fixture's); the graph is built without them (abstract_model).
    return nnx.split(abstract_model(_model_config(compute_dtype), formulation), nnx.Param)[0]


def _smooth_leaky_relu(x, negative_slope=0.01):
    """The leaky ReLU with its kink rounded off (slope·x + (1 - slope)·softplus(k·x)/k): the same
    nonlinearity, but a derivative that is continuous, so two roundings of a pre-activation near
    0 cannot give it the derivatives 1 and `slope`."""
    return negative_slope * x + (1 - negative_slope) * jax.nn.softplus(SMOOTH_KINK * x) / SMOOTH_KINK


def _program(graphdef, *, real=False, smooth=False):
    """f(params, x) -> {"outputs": the network's (logits, attention logits); "real": (loss, grads)
    of the test loss; "smooth": the same with every leaky ReLU replaced by _smooth_leaky_relu}.
    The activation is swapped while the gradient is traced, so one program holds both."""
    def loss(params, x):
        logits, attention = nnx.merge(graphdef, params)(x)
        return jnp.mean(logits ** 2) + sum(jnp.mean(z) for z in attention), (logits, attention)

    def f(params, x):
        out = {}
        if real:
            (value, out["outputs"]), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
            out["real"] = value, grads
        else:
            out["outputs"] = nnx.merge(graphdef, params)(x)
        if smooth:
            with pytest.MonkeyPatch.context() as m:
                m.setattr(jax.nn, "leaky_relu", _smooth_leaky_relu)
                (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
            out["smooth"] = value, grads
        return out

    return f


def _compile(fn, *args):
    """(StableHLO text, compiled) of jax.jit(fn): the text is that of the program that runs."""
    lowered = jax.jit(fn).lower(*args)
    return lowered.as_text(), lowered.compile()


def _folded_conv3(folds, dtype):
    """Per encoder stage, how StableHLO writes its residual blocks' 3³ convolution in the layout
    folded by f: a 2-D convolution over D, H of the (N·W/f, D, H, (f + 2)·C) blocks (their f
    sub-positions along W and the one of each W neighbour that the taps reach) to f·C channels."""
    signatures = []
    for i, (c, f) in enumerate(zip(WIDTHS, folds)):
        s, n, cin, cout = PATCH >> i, BATCH * (PATCH >> i) // f, (f + 2) * c, f * c
        signatures.append(f"(tensor<{n}x{s}x{s}x{cin}x{dtype}>, tensor<3x3x{cin}x{cout}x{dtype}>) -> "
                          f"tensor<{n}x{s}x{s}x{cout}x{dtype}>")
    return signatures


# The StableHLO dimension numbers of a 3-D and a 2-D channels-last convolution.
CONV_3D = "dim_numbers = [b, 0, 1, 2, f]x"
CONV_2D = "dim_numbers = [b, 0, 1, f]x"


def _assert_folded(tpu_text, plain_text, folds, dtype):
    """The TPU program runs every stage folded by `folds` and no 3-D convolution; the plain one
    only 3-D convolutions. (A shape alone would not tell: the plain program also holds the
    folded branch's residual shapes, zeros from lax.platform_dependent's other branch.)"""
    for i, signature in enumerate(_folded_conv3(folds, dtype)):
        assert signature in tpu_text, (i, signature)
    assert CONV_3D not in tpu_text and CONV_2D in tpu_text
    assert CONV_3D in plain_text and CONV_2D not in plain_text


def _float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _errors(tree, ref):
    """Per leaf of a gradient tree, its relative (L2) error against ref's, computed in float64:
    (paths, errors)."""
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    errors = [float(np.linalg.norm(np.ravel(a - r)) / np.linalg.norm(np.ravel(r)))
              for a, (_, r) in zip(jax.tree.leaves(_float64(tree)), leaves)]
    return [jax.tree_util.keystr(p) for p, _ in leaves], np.array(errors)


@pytest.fixture(scope="module")
def reference():
    """The inputs (float32 parameters, x) and the plain network's outputs and real and smooth
    losses and gradients (see _program) computed in float64, as numpy float64 trees."""
    _, params = nnx.split(build_model(_model_config("float32"), nnx.Rngs(0)), nnx.Param)
    x = jax.random.normal(jax.random.key(1), (BATCH,) + (PATCH,) * 3 + (4,))
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)  # noqa: E731
        _, compiled = _compile(_program(_graphdef("float64"), real=True, smooth=True), jax.tree.map(to64, params),
                               to64(x))
        values = _float64(compiled(jax.tree.map(to64, params), to64(x)))
    return params, x, values


def test_tpu_formulation_in_bf16_is_as_accurate_as_the_plain_network(reference):
    """In bfloat16 the TPU formulation rounds in other places than the plain network (its folded
    kernels' gradients are sums of per-block bfloat16 gradients, its convolutions reduce in
    another order), so the two are compared with the float64 network as the reference: the
    relative (L2) gradient error, averaged over the leaves, is at most 1.25x the plain bfloat16
    network's, and each leaf's at most 3x plus 1 %. Measured over 20 seeds of parameters and
    input: 0.66x to 0.74x on average, 2.2x at worst on a leaf (whose plain error is 0.2 %), no
    leaf above 3x its plain error (the 1 % is margin); the losses 4e-4 apart at most. (Both
    forms miss one leaf by far in every draw: gates[1].to_maps.bias, the gradient of the
    attention logits' mean, 96 % off in plain bfloat16 and 40 % in the TPU form.)

    The TPU program is the folded one, by 16, 8 and 4 in the three stages (brats21 folds by 4, 2
    and 1 at 128³), every residual block under jax.checkpoint (tpu_remat_min_voxels = 0), and its
    text shows it: each stage's 3³ convolutions are 2-D ones over the layout folded by its fold,
    and none is 3-D, where the plain program's are all 3-D (were the formulation ignored, the two
    programs would be one)."""
    params, x, ref = reference
    folds = [fold_factor(w, PATCH >> i) for i, w in enumerate(WIDTHS)]
    assert folds == [16, 8, 4]
    tpu_form = Formulation(platform="tpu", tpu_remat_min_voxels=0)
    plain_text, plain = _compile(_program(_graphdef("bfloat16"), real=True), params, x)
    tpu_text, tpu = _compile(_program(_graphdef("bfloat16", tpu_form), real=True), params, x)
    _assert_folded(tpu_text, plain_text, folds, "bf16")
    assert "optimization_barrier" in tpu_text and "optimization_barrier" not in plain_text

    plain, tpu = plain(params, x)["real"], tpu(params, x)["real"]
    np.testing.assert_allclose(tpu[0], plain[0], rtol=1e-2)
    paths, err_plain = _errors(plain[1], ref["real"][1])
    _, err_tpu = _errors(tpu[1], ref["real"][1])
    assert np.mean(err_tpu) <= 1.25 * np.mean(err_plain), (np.mean(err_tpu), np.mean(err_plain))
    for path, e_plain, e_tpu in zip(paths, err_plain, err_tpu):
        assert e_tpu <= 3 * e_plain + 1e-2, (path, e_tpu, e_plain)


def test_blocks_are_rematerialised_on_tpu_only():
    # Lowered (not compiled: no TPU needed) for each platform: jax.checkpoint shows as
    # optimization barriers around each block's recomputation, on TPU and nowhere else.
    config = tiny.get_config()
    config.model.tpu_remat_min_voxels = 0  # every block, from the config key
    x = jnp.zeros((1,) + tuple(config.data.patch) + (4,))
    graphdef, params = nnx.split(abstract_model(config.model), nnx.Param)  # shapes suffice to lower

    def loss(params):
        logits, attention = nnx.merge(graphdef, params)(x)
        return jnp.mean(logits ** 2) + sum(jnp.mean(z) for z in attention)

    with formulations.lowering_for("tpu", "cuda"):  # traced for every platform it is lowered for
        traced = jax.jit(jax.grad(loss)).trace(params)
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
    assert "optimization_barrier" in text["tpu"]
    assert "optimization_barrier" not in text["cpu"] and "optimization_barrier" not in text["cuda"]


def test_folded_formulation_is_the_plain_network(reference):
    """The TPU formulation folds W into the channels wherever a stage is narrower than the lanes.
    With 32 lanes, widths (8, 16, 32) fold by 4, 2 and 1 as brats21's 32, 64 and 128 do in 128
    lanes: stem, residual blocks (encoder and decoder, with and without a skip conv), the strided
    downsampling between folds, the 1³ convolutions, gates and head. In float32 it gives the
    plain network's outputs and gradients to float32 rounding, as the plain network does: each
    is compared with the float64 reference.

    The gradients are those of the network with the leaky ReLU's kink rounded off
    (_smooth_leaky_relu; the outputs are the real network's). With the real kink a pre-activation
    within rounding of 0 lands on opposite sides of it in two programs, switching that voxel's
    derivative between 1 and 0.01: over 30 seeds, 10 of 90 float32 programs (plain, folded by 32
    and by 128 lanes alike) had gradient leaves 4e-4 to 7e-3 away from float64, where the rest
    stayed below 6e-6. Measured with the rounded kink over 20 seeds (60 programs): gradient
    leaves at most 8.6e-6 from float64 (relative L2), outputs 2.9e-6 (of their largest value),
    the loss 6e-7; tolerances 5e-5, 2e-5 and 5e-6. A folded gate that lost its stop_gradient is
    0.2 to 1.2 away."""
    params, x, ref = reference
    folds = [fold_factor(w, PATCH >> i, lanes=32) for i, w in enumerate(WIDTHS)]
    assert folds == [4, 2, 1]
    folded_form = Formulation(platform="tpu", tpu_fold_lanes=32)
    plain_text, plain = _compile(_program(_graphdef("float32"), smooth=True), params, x)
    folded_text, folded = _compile(_program(_graphdef("float32", folded_form), smooth=True), params, x)
    # The folded program is another program: e.g. stage 0 (2 x 16³ x 8) runs in the folded
    # layout, W blocks in the batch (2·16/4 = 8) and 4·8 = 32 channels, its 3³ convolutions 2-D.
    _assert_folded(folded_text, plain_text, folds, "f32")

    for name, program in (("plain", plain), ("folded", folded)):
        values = _float64(program(params, x))
        for a, r in zip(jax.tree.leaves(values["outputs"]), jax.tree.leaves(ref["outputs"])):
            assert np.max(np.abs(a - r)) <= 2e-5 * np.max(np.abs(r)), (name, np.max(np.abs(a - r)))
        np.testing.assert_allclose(values["smooth"][0], ref["smooth"][0], rtol=5e-6, err_msg=name)
        paths, errors = _errors(values["smooth"][1], ref["smooth"][1])
        assert errors.max() <= 5e-5, (name, paths[errors.argmax()], errors.max())


def test_only_the_platforms_a_trace_can_be_lowered_for_are_traced():
    """On a CPU-only process the TPU branches are not traced (tracing them cost as much as the
    network); where a TPU lowering may follow (lowering_for, may_lower_for) they are, and each
    platform gets its own branch."""
    calls = []

    def branch(name):
        return lambda v: calls.append(name) or v + {"tpu": 1.0, "default": 2.0}[name]

    def f(v):
        return Formulation().on_tpu(v, branch("tpu"), branch("default"))

    x = jnp.zeros(())
    assert float(jax.jit(f)(x)) == 2.0 and calls == ["default"]
    calls.clear()
    with formulations.lowering_for("tpu"):
        traced = jax.jit(lambda v: f(v)).trace(x)  # a new function: traced anew
    assert sorted(calls) == ["default", "tpu"]
    assert "tpu" not in formulations._OTHER_PLATFORMS  # undone on exit
    cpu = traced.lower(lowering_platforms=("cpu",)).compile()
    assert float(cpu(x)) == 2.0
    assert "add" in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_only_the_declaring_helpers_take_tpu_or_gpu_topology_devices():
    """A program traced for TPU or GPU devices gets those platforms' formulations only if the
    formulations know it may be lowered for them (may_lower_for). compile_check.topology_devices
    and gpu_compile.gpu_devices say so; a script that took the devices straight from jax compiled
    the plain formulation for the TPU unnoticed. So nothing else in the project takes them."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    helpers = {root / "segguided_jax" / "compilation" / "compile_check.py", root / "segguided_jax" / "compilation" / "gpu_compile.py"}
    call = "get_topology_desc" + "("
    found = [str(p.relative_to(root)) for folder in ("segguided_jax", "benchmarks", "launch", "tests", "data_prep", "configs")
             for p in sorted((root / folder).rglob("*.py")) if p not in helpers and call in p.read_text()]
    assert found == [], f"take topology devices through compile_check.topology_devices or gpu_compile.gpu_devices: {found}"


@pytest.mark.parametrize("key, value", [("formulation", "gpu"), ("tpu_remat_min_voxels", -1)])
def test_a_formulation_that_cannot_work_is_refused_naming_its_key(key, value):
    config = tiny.get_config().model
    setattr(config, key, value)
    with pytest.raises(ValueError, match=f"model.{key}"):
        build_model(config, nnx.Rngs(0))


def test_the_train_step_takes_the_formulation_from_the_config():
    """The config's model.formulation reaches the program the training command compiles: the
    train step of the tiny config, built by steps.sharded_steps as training/loop.py builds it, runs its 3³
    convolutions as 2-D ones in the folded layout with "tpu" and as 3-D ones with "auto" (this
    CPU's forms); the formulation is part of the model's graph, so jit compiles each anew. (Where
    W does not divide into the fold, at the coarsest stages, a 1³ convolution stays 3-D.)"""
    import re
    from segguided_jax.parallel import sharding
    from segguided_jax.training.steps import abstract_batch, sharded_steps

    texts = {}
    for form in ("auto", "tpu"):
        config = tiny.get_config()
        config.model.formulation = form
        mesh = sharding.make_mesh(config.mesh)
        fns = sharded_steps(config, mesh)
        texts[form] = fns.step.lower(fns.abstract, abstract_batch(config, mesh)).as_text()
    conv3d_3x3x3 = re.compile(re.escape(CONV_3D) + r".*: \(tensor<[^>]*>, tensor<3x3x3x")
    assert conv3d_3x3x3.search(texts["auto"]) and CONV_2D not in texts["auto"]
    assert not conv3d_3x3x3.search(texts["tpu"]) and CONV_2D in texts["tpu"]


def test_the_train_command_runs_the_tpu_formulation_from_its_config_key(data_dir, tmp_path):
    """`python -m segguided_jax.train ... --config.model.formulation=tpu` trains with the folded
    forms on this CPU; its first step's loss (the same parameters, the same batch) equals the one
    of the default forms to float32 rounding. (That the key changes the program the command
    compiles, sharded_steps' train step, is test_the_train_step_takes_the_formulation_from_the_config.)"""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    losses = {}
    for form in ("auto", "tpu"):
        workdir = tmp_path / form
        run = subprocess.run([sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py",
                              f"--workdir={workdir}", f"--config.data.dir={data_dir}", f"--config.model.formulation={form}",
                              "--config.train.steps=1", "--config.train.log_every=1"],
                             cwd=root, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        losses[form] = [r["loss"] for r in rows if r["step"] == 1 and "split" not in r]
    assert len(losses["auto"]) == 1, losses
    np.testing.assert_allclose(losses["tpu"], losses["auto"], rtol=1e-5)
