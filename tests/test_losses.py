import jax.numpy as jnp
import numpy as np
import pytest

from segguided_jax.losses import attention_loss, downsample_masks, soft_dice_loss, stage_weights


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


def test_attention_loss_lower_for_maps_matching_the_subregions():
    labels = np.zeros((1, 8, 8, 8), np.int32)
    labels[0, 2:6, 2:6, 2:6] = 2
    labels[0, 3:5, 3:5, 3:5] = 1
    onehot = np.stack([labels == 1, labels == 2, labels == 3], -1).astype(np.float32)
    perfect = (jnp.asarray(downsample_masks(jnp.asarray(onehot), (4, 4, 4))), jnp.asarray(onehot))
    wrong = tuple(1 - a for a in perfect)
    w = stage_weights(2)
    good = float(attention_loss(perfect, jnp.asarray(labels), w, batch_dice=True, smooth=1e-5))
    bad = float(attention_loss(wrong, jnp.asarray(labels), w, batch_dice=True, smooth=1e-5))
    assert good < 0.5 < bad
