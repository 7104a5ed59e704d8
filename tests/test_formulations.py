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


def test_tpu_formulation_in_bf16_is_as_accurate_as_the_plain_network(monkeypatch):
    """In bfloat16 the TPU formulation rounds in other places than the plain network (its folded
    kernels' gradients are sums of per-block bfloat16 gradients, its convolutions reduce in
    another order), so the two are compared with the float32 network as the reference: the
    relative (L2) gradient error, averaged over the leaves, is at most 1.25x the plain bfloat16
    network's, and each leaf's at most 3x plus 1 % (measured: 1.11x on average, 2.7x at worst on
    a leaf whose plain error is 0.9 %)."""
    monkeypatch.setattr(formulations, "TPU_REMAT_MIN_VOXELS", 0)
    config = tiny.get_config()
    x = jax.random.normal(jax.random.key(1), (2,) + tuple(config.data.patch) + (4,))
    graphdef, params, loss = _loss_and_grads(build_model(config.model, nnx.Rngs(0)), x)
    reference = jax.jit(jax.value_and_grad(loss))(params)
    config.model.compute_dtype = "bfloat16"
    graphdef, params, loss = _loss_and_grads(build_model(config.model, nnx.Rngs(0)), x)
    plain = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(formulations, "FORCE_PLATFORM", "tpu")
    tpu = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(tpu[0], plain[0], rtol=1e-2)

    def error(a, ref):
        return float(jnp.linalg.norm((a - ref).ravel()) / jnp.linalg.norm(ref.ravel()))

    leaves = list(zip(jax.tree_util.tree_leaves_with_path(reference[1]), jax.tree.leaves(plain[1]),
                      jax.tree.leaves(tpu[1])))
    err_plain = [error(a, ref) for (_, ref), a, _ in leaves]
    err_tpu = [error(b, ref) for (_, ref), _, b in leaves]
    assert np.mean(err_tpu) <= 1.25 * np.mean(err_plain), (np.mean(err_tpu), np.mean(err_plain))
    for ((path, _), _, _), e_plain, e_tpu in zip(leaves, err_plain, err_tpu):
        assert e_tpu <= 3 * e_plain + 1e-2, (jax.tree_util.keystr(path), e_tpu, e_plain)


def test_blocks_are_rematerialised_on_tpu_only(monkeypatch):
    monkeypatch.setattr(formulations, "TPU_REMAT_MIN_VOXELS", 0)
    # Lowered (not compiled: no TPU needed) for each platform: jax.checkpoint shows as
    # optimization barriers around each block's recomputation, on TPU and nowhere else.
    config = tiny.get_config()
    x = jnp.zeros((1,) + tuple(config.data.patch) + (4,))
    graphdef, params, loss = _loss_and_grads(build_model(config.model, nnx.Rngs(0)), x)
    traced = jax.jit(jax.grad(loss)).trace(params)
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
    assert "optimization_barrier" in text["tpu"]
    assert "optimization_barrier" not in text["cpu"] and "optimization_barrier" not in text["cuda"]


def test_folded_formulation_is_the_plain_network(monkeypatch):
    """The TPU formulation folds W into the channels wherever a stage is narrower than the lanes.
    With 32 lanes, tiny-like widths (8, 16, 32) fold by 4, 2 and 1 as brats21's 32, 64 and 128 do
    in 128 lanes: stem, residual blocks (encoder and decoder, with and without a skip conv), the
    strided downsampling between folds, the 1³ convolutions, gates and head. In float32 it gives
    the plain network's outputs and gradients to rounding."""
    monkeypatch.setattr(formulations, "TPU_FOLD_LANES", 32)
    config = tiny.get_config()
    config.model.widths = (8, 16, 32)
    config.model.down_kernel = 3
    config.model.upsample = "resize"
    config.model.compute_dtype = "float32"
    assert [formulations.fold_factor(w, 16 >> i) for i, w in enumerate(config.model.widths)] == [4, 2, 1]
    x = jax.random.normal(jax.random.key(1), (2,) + tuple(config.data.patch) + (4,))
    model = build_model(config.model, nnx.Rngs(0))
    graphdef, params, loss = _loss_and_grads(model, x)

    def outputs(params):
        logits, attention = nnx.merge(graphdef, params)(x)
        return logits, attention

    # (A new function for each jit: a traced program is cached by function, not by FORCE_PLATFORM.)
    plain = jax.jit(jax.value_and_grad(loss))(params)
    plain_out = jax.jit(lambda p: outputs(p))(params)
    monkeypatch.setattr(formulations, "FORCE_PLATFORM", "tpu")
    folded = jax.jit(jax.value_and_grad(loss))(params)
    folded_out = jax.jit(lambda p: outputs(p))(params)
    # The folded program is another program: stage 0 (2 x 16³ x 8) runs in the folded layout,
    # W blocks in the batch (2·16/4 = 8) and 4·8 = 32 channels.
    assert "8x16x16x32xf32" in jax.jit(lambda p: outputs(p)).lower(params).as_text()
    monkeypatch.setattr(formulations, "FORCE_PLATFORM", None)
    assert "8x16x16x32xf32" not in jax.jit(lambda p: outputs(p)).lower(params).as_text()
    monkeypatch.setattr(formulations, "FORCE_PLATFORM", "tpu")
    for a, b in zip(jax.tree.leaves(folded_out), jax.tree.leaves(plain_out)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(folded[0], plain[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(folded[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))
