import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import brats21, brats23, synthetic, tiny
from segguided_jax.models import blocks, formulations
from segguided_jax.models.network import abstract_model, build_model, gate_parameter_count, parameter_count


def _tiny_model(**overrides):
    cfg = tiny.get_config().model
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return build_model(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_attention_logits_shape_and_dtype(compute_dtype):
    model = _tiny_model(compute_dtype=compute_dtype)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 4)) * 3
    logits, attention = model(x)
    assert logits.shape == (2, 16, 16, 16, 3) and logits.dtype == jnp.float32
    # One map per decoder stage, coarsest first, K = 3 sub-regions; logits, in float32 whatever
    # the compute dtype, so that losses see them before any sigmoid rounds in bfloat16.
    assert [a.shape for a in attention] == [(2, 8, 8, 8, 3), (2, 16, 16, 16, 3)]
    for z in attention:
        assert z.dtype == jnp.float32
        assert float(z.std()) > 0  # maps depend on the input, not a constant
        assert float(z.min()) < 0  # logits, not maps squashed into [0, 1] already


def test_no_gate_model_has_no_maps_and_no_gate_parameters():
    model = _tiny_model(gates=False)
    _, attention = model(jnp.zeros((1, 16, 16, 16, 4)))
    assert attention == ()
    assert gate_parameter_count(model) == 0
    with_gates = _tiny_model()
    # The gates are the only difference: 2·K·C + K + C per decoder stage of width C.
    expected = sum(2 * 3 * c + 3 + c for c in tiny.get_config().model.widths[:-1])
    assert parameter_count(with_gates) - parameter_count(model) == expected == gate_parameter_count(with_gates)


def test_labels_head_has_four_channels():
    logits, _ = _tiny_model(output="labels")(jnp.zeros((1, 16, 16, 16, 4)))
    assert logits.shape[-1] == 4


@pytest.mark.parametrize("config_module", [brats21, brats23])
def test_gate_overhead_below_paper_bound_at_paper_scale(config_module):
    model = abstract_model(config_module.get_config().model)  # eval_shape: nothing allocated
    total, gates = parameter_count(model), gate_parameter_count(model)
    print(f"{config_module.__name__}: {total} parameters, gates {gates} ({100 * gates / total:.4f} %)")
    assert gates > 0
    assert gates / total < 0.002


@pytest.mark.parametrize("config_module", [synthetic, tiny, brats21, brats23])
def test_every_config_loads_and_builds(config_module):
    config = config_module.get_config()
    model = abstract_model(config.model)
    assert parameter_count(model) > 0
    # Patches must be divisible by the network's total downsampling.
    factor = 2 ** (len(config.model.widths) - 1)
    assert all(p % factor == 0 for p in config.data.patch)
    assert tuple(config.eval.window) == tuple(config.data.patch)


def test_forward_output_matches_abstract_shapes():
    cfg = tiny.get_config().model
    abstract = abstract_model(cfg)
    concrete = build_model(cfg, nnx.Rngs(0))
    a = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(abstract, nnx.Param))
    c = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(concrete, nnx.Param))
    assert a == c
    assert np.isfinite(float(concrete(jnp.ones((1, 16, 16, 16, 4)))[0].mean()))


def _grads(module, x):
    """d(sum(out * w)) / d(params, x) for a fixed random weighting w of the output."""
    graphdef, params = nnx.split(module, nnx.Param)
    w = jax.random.normal(jax.random.key(7), nnx.merge(graphdef, params)(x).shape)

    def f(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32) * w)

    return jax.grad(f, argnums=(0, 1))(params, x)


def _assert_same(a, b, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), atol=atol, rtol=atol)


@pytest.mark.parametrize("kernel,stride,padding,use_bias,shape", [
    (1, 1, "SAME", True, (2, 8, 6, 4, 5)), (2, 2, "SAME", False, (2, 8, 6, 4, 5)),
    (2, 2, "VALID", True, (2, 8, 6, 4, 5)), (3, 1, "SAME", False, (2, 8, 6, 4, 5)),
    (3, 2, "SAME", True, (2, 8, 6, 4, 5)), (3, 2, "SAME", False, (1, 7, 5, 6, 5))])
def test_conv_matches_flax_conv_values_and_gradients(kernel, stride, padding, use_bias, shape):
    # Same parameters and seed: blocks.Conv must compute nnx.Conv's function, whichever path it takes.
    kw = dict(kernel_size=(kernel,) * 3, strides=(stride,) * 3, padding=padding, use_bias=use_bias,
              bias_init=nnx.initializers.normal(1.0))
    ours, ref = blocks.Conv(5, 7, rngs=nnx.Rngs(1), **kw), nnx.Conv(5, 7, rngs=nnx.Rngs(1), **kw)
    x = jax.random.normal(jax.random.key(0), shape)  # odd sizes: SAME padding of a strided conv
    assert ours(x).shape == ref(x).shape
    _assert_same(ours(x), ref(x), 1e-5)
    _assert_same(_grads(ours, x), _grads(ref, x), 1e-4)


def test_conv_transpose_matches_flax_values_and_gradients():
    kw = dict(kernel_size=(2, 2, 2), strides=(2, 2, 2), padding="VALID", bias_init=nnx.initializers.normal(1.0))
    ours, ref = blocks.ConvTranspose(5, 7, rngs=nnx.Rngs(1), **kw), nnx.ConvTranspose(5, 7, rngs=nnx.Rngs(1), **kw)
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 2, 5))
    assert ours(x).shape == ref(x).shape == (2, 8, 6, 4, 7)
    _assert_same(ours(x), ref(x), 1e-5)
    _assert_same(_grads(ours, x), _grads(ref, x), 1e-4)


def test_conv_keeps_compute_dtype():
    kw = dict(kernel_size=(2, 2, 2), strides=(2, 2, 2), dtype=jnp.bfloat16)
    ours, ref = blocks.Conv(4, 6, rngs=nnx.Rngs(2), **kw), nnx.Conv(4, 6, rngs=nnx.Rngs(2), **kw)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4, 4))
    assert ours(x).dtype == ref(x).dtype == jnp.bfloat16
    assert ours.kernel[...].dtype == jnp.float32  # parameters stay float32
    _assert_same(ours(x), ref(x), 3e-2)


def test_linear_upsampling_matches_jax_image_resize():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3, 6))
    ref = jax.image.resize(x, (2, 10, 8, 6, 6), method="trilinear")
    _assert_same(blocks.upsample_linear_x2(x), ref, 1e-6)
    # A linear ramp stays a ramp inside and is clamped at the edges: [0, 1] -> [0, .25, .75, 1].
    ramp = jnp.broadcast_to(jnp.arange(2.0)[None, :, None, None, None], (1, 2, 2, 2, 1))
    np.testing.assert_allclose(blocks.upsample_linear_x2(ramp)[0, :, 0, 0, 0], [0, 0.25, 0.75, 1.0])


def test_resize_upsampling_equals_resize_then_conv():
    # The 1³ conv runs before the resize (8x fewer voxels); linear maps commute, bias included.
    up = blocks.Upsample(6, 3, "resize", dtype=jnp.float32, rngs=nnx.Rngs(3))
    up.conv.bias[...] = jnp.arange(3.0)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 6))
    resized = jax.image.resize(x, (2, 8, 8, 8, 6), method="trilinear")
    _assert_same(up(x), nnx.Conv.__call__(up.conv, resized), 1e-5)


@pytest.mark.parametrize("chunk", [7, 64])
def test_weight_grad_scan_matches_xla(chunk):
    # Odd sizes and a chunk that does not divide the flat grid: every tap and edge must count once.
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 4, 3))
    g = jax.random.normal(jax.random.key(1), (2, 6, 5, 4, 7))
    conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=formulations.DN)
    ref = jax.vjp(conv, jnp.zeros((3, 3, 3, 3, 7)))[1](g)[0]
    _assert_same(formulations.conv3_weight_grad_scan(x, g, chunk=chunk), ref, 1e-4)


def test_conv_with_weight_grad_scan_matches_flax():
    kw = dict(kernel_size=(3, 3, 3), use_bias=False)
    scan = formulations.Formulation(cpu_scan_min_voxels=1)  # the scan path at a tiny size
    ours, ref = blocks.Conv(3, 5, rngs=nnx.Rngs(1), formulation=scan, **kw), nnx.Conv(3, 5, rngs=nnx.Rngs(1), **kw)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 6, 3))

    def weight_grad_program(module):
        graphdef, params = nnx.split(module, nnx.Param)
        return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)))).lower(params).as_text()

    # The formulation is taken: the weight gradient is the scan's loop, nnx.Conv's has none.
    assert "stablehlo.while" in weight_grad_program(ours)
    assert "stablehlo.while" not in weight_grad_program(ref)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 6, 3))
    _assert_same(ours(x), ref(x), 1e-5)
    _assert_same(_grads(ours, x), _grads(ref, x), 1e-4)
