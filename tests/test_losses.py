import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segguided_jax.training.losses import aux_dice_loss, attention_loss, downsample_masks, soft_dice_loss, stage_weights


def test_soft_dice_loss_known_values():
    t = jnp.zeros((1, 4, 4, 4, 1)).at[:, :2].set(1.0)
    assert float(soft_dice_loss(t, t, batch_dice=True, smooth=0)) == pytest.approx(0.0)
    assert float(soft_dice_loss(1 - t, t, batch_dice=True, smooth=0)) == pytest.approx(1.0)
    half = t.at[:, :1].set(0.0)  # predicts half of the target: Dice = 2·16 / (16 + 32) = 2/3
    assert float(soft_dice_loss(half, t, batch_dice=True, smooth=0)) == pytest.approx(1 / 3)


def test_downsample_masks_is_coverage_fraction():
    m = np.zeros((1, 4, 4, 4, 1), np.float32)
    m[0, 0, 0, 0] = 1  # one voxel of the first 2³ block
    m[0, 2:, 2:, 2:] = 1  # the whole last block
    pooled = np.asarray(downsample_masks(jnp.asarray(m), (2, 2, 2)))
    assert pooled[0, 0, 0, 0, 0] == pytest.approx(1 / 8)
    assert pooled[0, 1, 1, 1, 0] == pytest.approx(1.0)
    assert pooled.sum() == pytest.approx(1 / 8 + 1)


def test_stage_weights_default_halves_towards_coarse():
    assert stage_weights(3) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert stage_weights(2, (1.0, 3.0)) == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="3 decoder stages"):
        stage_weights(3, (1.0, 1.0))


def _logit(p):
    p = jnp.clip(p, 1e-3, 1 - 1e-3)
    return jnp.log(p) - jnp.log1p(-p)


def test_attention_loss_lower_for_maps_matching_the_subregions():
    labels = np.zeros((1, 8, 8, 8), np.int32)
    labels[0, 2:6, 2:6, 2:6] = 2
    labels[0, 3:5, 3:5, 3:5] = 1
    onehot = np.stack([labels == 1, labels == 2, labels == 3], -1).astype(np.float32)
    perfect = (jnp.asarray(downsample_masks(jnp.asarray(onehot), (4, 4, 4))), jnp.asarray(onehot))
    wrong = tuple(1 - a for a in perfect)
    w = stage_weights(2)
    good = float(attention_loss(tuple(_logit(a) for a in perfect), jnp.asarray(labels), w, smooth=1e-5))
    bad = float(attention_loss(tuple(_logit(a) for a in wrong), jnp.asarray(labels), w, smooth=1e-5))
    assert good < 0.5 < bad


def test_attention_loss_is_bce_plus_dice_from_logits():
    # One stage, one voxel per sub-region: the BCE is optax's on the logits, the Dice the soft one.
    labels = jnp.asarray([[[[1, 2, 3, 0]]]])  # (1, 1, 1, 4)
    z = jnp.full((1, 1, 1, 4, 3), -2.0).at[0, 0, 0, 0, 0].set(3.0)
    t = jax.nn.one_hot(labels - 1, 3)
    p = jax.nn.sigmoid(z)
    dice = 1 - jnp.mean((2 * jnp.sum(p * t, (0, 1, 2, 3))) / (jnp.sum(p + t, (0, 1, 2, 3))))
    bce = jnp.mean(-(t * jnp.log(p) + (1 - t) * jnp.log(1 - p)))
    got = attention_loss((z,), labels, [1.0], dice_mode="batch", smooth=0.0)
    assert float(got) == pytest.approx(float(dice + bce), rel=1e-5)
    assert got.dtype == jnp.float32
    assert float(attention_loss((z.astype(jnp.bfloat16),), labels, [1.0], smooth=0.0)) == pytest.approx(
        float(got), rel=1e-2)


def test_aux_dice_modes_on_a_sub_region_absent_from_one_sample():
    # Sample 0 has the map's sub-region and predicts it exactly; sample 1 lacks it and predicts
    # a little of it (2 of 8 voxels at 0.5).
    t = np.zeros((2, 2, 2, 2, 1), np.float32)
    t[0, 0] = 1
    p = t.copy()
    p[1, 0, 0] = 0.5
    t, p = jnp.asarray(t), jnp.asarray(p)
    batch = float(aux_dice_loss(p, t, mode="batch", smooth=0.0))
    assert batch == pytest.approx(1 - 2 * 4 / (5 + 4))  # sums over both samples
    assert float(aux_dice_loss(p, t, mode="sample", smooth=0.0)) == pytest.approx(0.5)  # (0 + 1) / 2
    assert float(aux_dice_loss(p, t, mode="present", smooth=0.0)) == pytest.approx(0.0)  # sample 1 left out
    assert float(aux_dice_loss(p, jnp.zeros_like(t), mode="present", smooth=0.0)) == 0.0
    with pytest.raises(ValueError, match="aux_dice"):
        aux_dice_loss(p, t, mode="global", smooth=0.0)
