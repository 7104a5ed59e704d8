import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import brats21, brats23, synthetic, tiny
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
