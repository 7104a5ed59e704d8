"""Training losses: Dice + BCE/CE on the output, and the auxiliary attention-map loss.

All take channels-last arrays: logits (N, D, H, W, K), labels (N, D, H, W) internal 0..3.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from segguided_jax.data.brats import labels_to_regions, labels_to_subregions

_EPS = 1e-6


def soft_dice_loss(probs, targets, *, batch_dice: bool, smooth: float):
    """1 - mean soft Dice over channels. With batch_dice the sums run over the whole batch
    (stable when a patch lacks a region); otherwise per sample, then averaged."""
    axes = tuple(range(0 if batch_dice else 1, probs.ndim - 1))
    inter = jnp.sum(probs * targets, axis=axes)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    return 1.0 - jnp.mean((2 * inter + smooth) / (denom + smooth))


def output_loss(logits, labels, *, output: str, batch_dice: bool, smooth: float):
    """Dice + BCE on sigmoid ET/TC/WT regions, or Dice (foreground labels) + CE on softmax labels."""
    if output == "regions":
        targets = labels_to_regions(labels).astype(jnp.float32)
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
        return soft_dice_loss(jax.nn.sigmoid(logits), targets, batch_dice=batch_dice, smooth=smooth) + bce
    onehot = jax.nn.one_hot(labels, 4, dtype=jnp.float32)
    ce = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
    probs = jax.nn.softmax(logits, axis=-1)
    return soft_dice_loss(probs[..., 1:], onehot[..., 1:], batch_dice=batch_dice, smooth=smooth) + ce


def downsample_masks(masks, shape):
    """Average-pools (N, D, H, W, K) masks to spatial `shape` (integer factors): the fraction of
    each coarse voxel that a sub-region covers, a soft target for a coarse attention map."""
    n, d, h, w, k = masks.shape
    fd, fh, fw = d // shape[0], h // shape[1], w // shape[2]
    if (fd * shape[0], fh * shape[1], fw * shape[2]) != (d, h, w):
        raise ValueError(f"cannot pool {masks.shape[1:4]} to {tuple(shape)} by whole factors")
    return masks.reshape(n, shape[0], fd, shape[1], fh, shape[2], fw, k).mean(axis=(2, 4, 6))


def stage_weights(num_stages: int, weights=None):
    """Per-stage weights of the auxiliary loss, coarsest stage first. Default: halving with each
    step away from full resolution, normalised to sum to 1."""
    if weights is None:
        weights = [0.5 ** (num_stages - 1 - j) for j in range(num_stages)]
    if len(weights) != num_stages:
        raise ValueError(f"loss.aux_stage_weights has {len(weights)} entries for {num_stages} decoder stages")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def attention_loss(attention, labels, weights, *, batch_dice: bool, smooth: float):
    """Σ_stage w_s · (Dice + BCE)(A_s, sub-region masks pooled to stage s). attention: tuple of
    (N, d, h, w, 3) maps in [0, 1], NCR/ED/ET."""
    masks = labels_to_subregions(labels).astype(jnp.float32)
    total = 0.0
    for a, w in zip(attention, weights):
        t = downsample_masks(masks, a.shape[1:4])
        a_clip = jnp.clip(a, _EPS, 1 - _EPS)
        bce = -jnp.mean(t * jnp.log(a_clip) + (1 - t) * jnp.log(1 - a_clip))
        total = total + w * (soft_dice_loss(a, t, batch_dice=batch_dice, smooth=smooth) + bce)
    return total


def total_loss(logits, attention, labels, loss_cfg, output: str):
    """Returns (loss, {"loss_seg", "loss_aux"}). The auxiliary term is λ · attention_loss; with
    λ = 0 or no gates it is 0 and adds nothing to the graph."""
    seg = output_loss(logits, labels, output=output, batch_dice=loss_cfg.batch_dice, smooth=loss_cfg.dice_smooth)
    aux = jnp.zeros((), jnp.float32)
    if attention and loss_cfg.aux_weight > 0:
        weights = stage_weights(len(attention), loss_cfg.aux_stage_weights)
        aux = attention_loss(attention, labels, weights, batch_dice=loss_cfg.batch_dice, smooth=loss_cfg.dice_smooth)
    return seg + loss_cfg.aux_weight * aux, {"loss_seg": seg, "loss_aux": aux}
