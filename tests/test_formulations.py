"""models.formulations: each backend's formulation computes the plain network's values."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from segguided_jax.models import formulations
from segguided_jax.models.network import build_model


def _loss_and_grads(model, x):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits, attention = nnx.merge(graphdef, params)(x)
        return jnp.mean(logits ** 2) + sum(jnp.mean(z) for z in attention)

    return graphdef, params, loss


def test_tpu_formulation_matches_plain_on_cpu_within_bf16(monkeypatch):
    monkeypatch.setattr(formulations, "TPU_REMAT_BLOCKS", True)
    config = tiny.get_config()
    config.model.compute_dtype = "bfloat16"
    x = jax.random.normal(jax.random.key(1), (2,) + tuple(config.data.patch) + (4,))
    graphdef, params, loss = _loss_and_grads(build_model(config.model, nnx.Rngs(0)), x)
    plain = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(formulations, "FORCE_PLATFORM", "tpu")
    tpu = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(tpu[0], plain[0], rtol=1e-2)
    for a, b in zip(jax.tree.leaves(tpu[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(b))))


def test_blocks_are_rematerialised_on_tpu_only(monkeypatch):
    monkeypatch.setattr(formulations, "TPU_REMAT_BLOCKS", True)
    # Lowered (not compiled: no TPU needed) for each platform: jax.checkpoint shows as
    # optimization barriers around each block's recomputation, on TPU and nowhere else.
    config = tiny.get_config()
    x = jnp.zeros((1,) + tuple(config.data.patch) + (4,))
    graphdef, params, loss = _loss_and_grads(build_model(config.model, nnx.Rngs(0)), x)
    traced = jax.jit(jax.grad(loss)).trace(params)
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
    assert "optimization_barrier" in text["tpu"]
    assert "optimization_barrier" not in text["cpu"] and "optimization_barrier" not in text["cuda"]
