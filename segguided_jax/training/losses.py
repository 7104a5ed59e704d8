"""Training losses: Dice + BCE/CE on the output, and the auxiliary attention-map loss.

All take channels-last arrays: logits (N, D, H, W, K), labels (N, D, H, W) internal 0..3.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from segguided_jax.data.brats import labels_to_regions, labels_to_subregions

def soft_dice_loss(probs, targets, *, batch_dice: bool, smooth: float):
    """1 - mean soft Dice over channels. With batch_dice the sums run over the whole batch
    (stable when a patch lacks a region); otherwise per sample, then averaged."""
    axes = tuple(range(0 if batch_dice else 1, probs.ndim - 1))
    inter = jnp.sum(probs * targets, axis=axes)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    return 1.0 - jnp.mean((2 * inter + smooth) / (denom + smooth))


def output_loss(logits, labels, *, output: str, batch_dice: bool, smooth: float):
    """Dice + BCE on sigmoid ET/TC/WT regions, or Dice (foreground labels) + CE on softmax labels.
    logits: float32; the cross-entropies are optax's, computed from logits (stable)."""
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


AUX_DICE_MODES = ("batch", "sample", "present")


def aux_dice_loss(probs, targets, *, mode: str, smooth: float):
    """1 - soft Dice of (N, d, h, w, K) maps against their targets, per map. mode "batch": sums over
    the whole batch; "sample": per sample, then averaged; "present": per sample, averaged only over
    the (sample, map) pairs whose target is not empty (0 when none is), so that a sub-region absent
    from a patch adds neither a constant nor a push; false positives there are left to the BCE."""
    if mode == "batch":
        return soft_dice_loss(probs, targets, batch_dice=True, smooth=smooth)
    axes = tuple(range(1, probs.ndim - 1))
    inter = jnp.sum(probs * targets, axis=axes)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    dice = (2 * inter + smooth) / (denom + smooth)  # (N, K)
    if mode == "sample":
        return 1.0 - jnp.mean(dice)
    if mode != "present":
        raise ValueError(f"loss.aux_dice must be one of {AUX_DICE_MODES}, got {mode!r}")
    present = (jnp.sum(targets, axis=axes) > 0).astype(dice.dtype)
    return jnp.sum(present * (1.0 - dice)) / jnp.maximum(jnp.sum(present), 1.0)


def attention_loss(attention, labels, weights, *, dice_mode: str = "batch", smooth: float):
    """Σ_stage w_s · (Dice + BCE)(sigmoid(Z_s), sub-region masks pooled to stage s).

    attention: tuple of (N, d, h, w, 3) map logits Z_s (NCR/ED/ET), any float dtype; the loss is
    computed in float32 from the logits (optax's stable sigmoid cross-entropy), so a confidently
    wrong voxel keeps its gradient even when the network runs in bfloat16. labels: (N, D, H, W)
    internal 0..3. Returns a float32 scalar.
    """
    masks = labels_to_subregions(labels).astype(jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for z, w in zip(attention, weights):
        z = z.astype(jnp.float32)
        t = downsample_masks(masks, z.shape[1:4])
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(z, t))
        total = total + w * (aux_dice_loss(jax.nn.sigmoid(z), t, mode=dice_mode, smooth=smooth) + bce)
    return total


def total_loss(logits, attention, labels, loss_cfg, output: str):
    """logits (N, D, H, W, 3 or 4), attention the network's tuple of map logits, labels (N, D, H, W)
    internal 0..3. Returns (loss, {"loss_seg", "loss_aux"}), float32 whatever the compute dtype.
    The auxiliary term is λ · attention_loss; with λ = 0 or no gates it is 0 and adds nothing to
    the graph."""
    seg = output_loss(logits.astype(jnp.float32), labels, output=output, batch_dice=loss_cfg.batch_dice,
                      smooth=loss_cfg.dice_smooth)
    aux = jnp.zeros((), jnp.float32)
    if attention and loss_cfg.aux_weight > 0:
        weights = stage_weights(len(attention), loss_cfg.aux_stage_weights)
        aux = attention_loss(attention, labels, weights, dice_mode=loss_cfg.aux_dice, smooth=loss_cfg.dice_smooth)
    return seg + loss_cfg.aux_weight * aux, {"loss_seg": seg, "loss_aux": aux}
