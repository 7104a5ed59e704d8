"""The SegAttentionGates explain: each map follows its own sub-region, its loss keeps a gradient in
bfloat16, and the gates stay a small share of the network."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from segguided_jax.training.losses import attention_loss, total_loss
from segguided_jax.models.network import build_model


def _labels_with_ncr():
    """(1, 16, 16, 16) internal labels: background with a 4³ block of NCR."""
    labels = np.zeros((1, 16, 16, 16), np.int32)
    labels[0, 6:10, 6:10, 6:10] = 1
    return jnp.asarray(labels)


def _total_loss_grad(model, cfg):
    """Gradient of the total loss w.r.t. the model's parameters on a random image whose labels
    hold one NCR block (_labels_with_ncr)."""
    graphdef, params = nnx.split(model, nnx.Param)
    labels = _labels_with_ncr()
    image = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 4))

    def loss(p):
        logits, attention = nnx.merge(graphdef, p)(image)
        return total_loss(logits, attention, labels, cfg.loss, cfg.model.output)[0]

    return jax.jit(jax.grad(loss))(params)


def test_aux_loss_gradient_on_confidently_wrong_bf16_logits():
    # NCR map: logit -8 everywhere, so its NCR voxels are confidently wrong negatives. ED map:
    # logit +8 everywhere, and there is no ED, so every voxel is a confidently wrong positive.
    # In bfloat16, sigmoid(±8) rounds to exactly 1 or 0; a loss on those probabilities has no
    # gradient. From float32 logits the gradient is there and points towards the target.
    labels = _labels_with_ncr()
    z = jnp.zeros((1, 16, 16, 16, 3), jnp.bfloat16).at[..., 0].set(-8).at[..., 1].set(8).at[..., 2].set(-8)
    assert float(jax.nn.sigmoid(jnp.bfloat16(8))) == 1.0  # the rounding that defeated the old loss
    g = jax.grad(lambda z: attention_loss((z,), labels, [1.0], smooth=1e-5))(z)
    assert g.dtype == jnp.bfloat16
    g = np.asarray(g, np.float32)
    ncr = np.asarray(labels[0] == 1)
    assert (g[0][ncr][:, 0] < 0).all()  # descent raises the NCR logit inside NCR
    assert (g[0][..., 1] > 0).all()  # and lowers the ED logit everywhere
    # A confidently right voxel (NCR map outside NCR, ET map without ET) gets a far smaller push.
    assert np.abs(g[0][~ncr][:, 0]).max() < 1e-2 * np.abs(g[0][ncr][:, 0]).min()


def test_bf16_network_map_bias_gets_the_right_gradient():
    # The same through the network in bfloat16: the finest gate's map conv made constant
    # (kernel 0, bias ±8), the gradient of the total loss on its bias must move each map towards
    # its target: the NCR bias up (NCR present), the ED and ET biases down (both absent).
    cfg = tiny.get_config()
    cfg.model.compute_dtype = "bfloat16"
    model = build_model(cfg.model, nnx.Rngs(0))
    to_maps = model.gates[-1].to_maps
    to_maps.kernel[...] = jnp.zeros_like(to_maps.kernel[...])
    to_maps.bias[...] = jnp.asarray([-8.0, 8.0, 8.0])
    g = _total_loss_grad(model, cfg)
    bias_grad = np.asarray(g["gates"][len(model.gates) - 1]["to_maps"]["bias"][...])
    assert bias_grad[0] < 0 and bias_grad[1] > 0 and bias_grad[2] > 0


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_gate_stop_gradient_keeps_the_segmentation_loss_off_the_maps(stop_gradient):
    cfg = tiny.get_config()
    cfg.model.gate_stop_gradient = stop_gradient
    cfg.loss.aux_weight = 0.0  # the segmentation loss alone
    g = _total_loss_grad(build_model(cfg.model, nnx.Rngs(0)), cfg)
    for i in range(len(cfg.model.widths) - 1):
        to_maps = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g["gates"][i]["to_maps"])])
        to_gate = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g["gates"][i]["to_gate"])])
        assert np.abs(to_gate).max() > 0  # the gate itself still learns from the segmentation
        if stop_gradient:
            assert np.abs(to_maps).max() == 0.0
        else:
            assert np.abs(to_maps).max() > 0


# Per tissue (background white matter, NCR, ED, ET), the mean intensity on T1, T1ce, T2, FLAIR:
# the synthetic set's contrasts (data_prep.synthetic.INTENSITY).
_INTENSITY = np.array([[0.82, 0.82, 0.45, 0.45], [0.30, 0.22, 0.95, 0.62],
                       [0.50, 0.50, 0.88, 0.98], [0.55, 1.25, 0.72, 0.80]], np.float32)


def _fixed_batch():
    """Two 16³ cases with known sub-regions: oedema around a core whose centre is necrotic and
    whose rim enhances (case 0), or a core that is all necrosis, as in a glioma without
    enhancement (case 1). Images: the tissues' intensities plus noise, z-scored per channel."""
    rng = np.random.default_rng(0)
    grid = np.indices((16, 16, 16)).astype(np.float32) + 0.5
    labels = np.zeros((2, 16, 16, 16), np.int32)
    for n, (centre, has_et) in enumerate([((8.0, 8.0, 8.0), True), ((7.0, 9.0, 8.5), False)]):
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        labels[n][d < 6.5] = 2
        labels[n][d < 4.5] = 3 if has_et else 1
        labels[n][d < 2.5] = 1
    image = _INTENSITY[labels] + 0.05 * rng.standard_normal(labels.shape + (4,)).astype(np.float32)
    image = (image - image.mean((0, 1, 2, 3))) / image.std((0, 1, 2, 3))
    return {"image": jnp.asarray(image), "label": jnp.asarray(labels.astype(np.uint8))}


def _dice_matrix(maps, labels):
    """maps (X, Y, Z, 3) NCR/ED/ET in [0, 1], labels (X, Y, Z) internal: soft Dice of every map
    (rows) with every sub-region (columns), as metrics.soft_dice computes it."""
    from segguided_jax.evaluation.metrics import soft_dice

    return np.array([[soft_dice(maps[..., m], labels == s + 1) for s in range(3)] for m in range(3)])


def test_each_map_follows_its_own_sub_region_on_a_fixed_batch():
    from segguided_jax.inference.predictor import window_outputs
    from segguided_jax.training.optim import make_optimizer
    from segguided_jax.training.steps import init_state, train_step

    cfg = tiny.get_config()  # the default gate and loss settings of every config
    # The demo's finest width (8 channels): the maps are a 1³ readout of that stage, and from the
    # tiny config's 4 channels NCR apart from ET was learnt from some initialisations only (2 of 4
    # seeds); at 8 channels, 7 of 7 seeds gave own-region soft Dice >= 0.9 and off-diagonal <= 0.03
    # (300 steps).
    cfg.model.widths = (8, 16, 32)
    # 160 steps (one cosine cycle): own-region soft Dice >= 0.91 and >= 54x the off-diagonal here
    # (120 steps: 0.75 and 10x; 200: 0.96 and 101x), against the 0.5 and 2x asserted.
    steps = 160
    batch = _fixed_batch()
    tx = make_optimizer(cfg.optim, steps)
    state = jax.jit(functools.partial(init_state, 0, cfg.model, tx))()
    step = jax.jit(functools.partial(train_step, loss_cfg=cfg.loss, output=cfg.model.output), donate_argnums=0)
    for _ in range(steps):
        state, _ = step(state, batch)
    out = np.asarray(window_outputs(state.graphdef, state.params, batch["image"], output=cfg.model.output,
                                    attention_stages=(-1,)))
    labels = np.asarray(batch["label"])
    for n in range(2):
        matrix = _dice_matrix(out[n, ..., 3:], labels[n])
        for s in range(3):
            if not (labels[n] == s + 1).any():
                continue
            own, others = matrix[s, s], np.delete(matrix[s], s)
            # The map's Dice with its own sub-region dominates its Dice with either other one.
            assert own >= 2 * others.max(), f"case {n}, map {s}: soft Dice row {np.round(matrix[s], 3)}"
            assert own >= 0.5, f"case {n}, map {s}: soft Dice row {np.round(matrix[s], 3)}"
