"""Sliding-window inference with Gaussian importance weighting (the nnU-Net scheme).

Windows are placed so that neighbours overlap by at least `overlap` of the window, evenly spread
from edge to edge; each window's output is weighted by a Gaussian centred on the window (sigma =
window / 8), so that predictions near window borders, which see less context, count less.
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from segguided_jax.data.brats import regions_to_labels


def gaussian_weights(window, sigma_scale: float = 1 / 8) -> np.ndarray:
    """Importance map of shape `window`, max 1, strictly positive."""
    delta = np.zeros(window, np.float32)
    delta[tuple(w // 2 for w in window)] = 1
    g = ndimage.gaussian_filter(delta, [w * sigma_scale for w in window], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()  # far corners would otherwise get no weight at all
    return g.astype(np.float32)


def window_starts(shape, window, overlap: float):
    """Start corners of the windows covering `shape` (every dim >= window)."""
    per_axis = []
    for size, w in zip(shape, window):
        if size < w:
            raise ValueError(f"volume dim {size} smaller than window {w}; pad first")
        n = math.ceil((size - w) / (w * (1 - overlap))) + 1 if size > w else 1
        step = (size - w) / max(n - 1, 1)
        per_axis.append(sorted({int(round(step * i)) for i in range(n)}))
    return list(itertools.product(*per_axis))


def _to_regions(logits, output: str):
    """Logits -> ET/TC/WT probabilities; with a softmax head a region's probability is the sum of
    its labels' probabilities."""
    if output == "regions":
        return jax.nn.sigmoid(logits)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.stack([p[..., 3], p[..., 1] + p[..., 3], 1 - p[..., 0]], axis=-1)


def mirror_sets(axes) -> list[tuple]:
    """Every subset of the spatial axes to mirror for test-time augmentation (2**len(axes) sets)."""
    axes = tuple(axes)
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2 ** len(axes))]


def window_outputs(graphdef, params, x, *, output: str, mirror_axes=(), attention_stages=()):
    """Per-voxel outputs of a batch of windows x (N, D, H, W, 4).

    Returns (N, D, H, W, 3 + 3·[attention_stages non-empty]) float32: the ET/TC/WT region
    probabilities, then (if asked) the NCR/ED/ET attention maps averaged over the chosen decoder
    stages (indices into the coarsest-first stage list, e.g. -1 = finest), each resized to the
    window by trilinear interpolation. With mirror_axes (spatial axes 0..2), the outputs are the
    mean over every combination of mirrored axes (up to 8 passes), each mirrored back.
    """
    model = nnx.merge(graphdef, params)
    total = 0.0
    flips = mirror_sets(mirror_axes)
    for axes in flips:
        spatial = tuple(a + 1 for a in axes)
        xi = jnp.flip(x, spatial) if axes else x
        logits, attention = model(xi)
        parts = [_to_regions(logits, output)]
        if attention_stages:
            # The network returns map logits; the maps are their sigmoid, resized as probabilities.
            maps = [jax.image.resize(jax.nn.sigmoid(attention[s]), logits.shape[:4] + (attention[s].shape[-1],),
                                     "trilinear") for s in attention_stages]
            parts.append(sum(maps) / len(maps))
        out = jnp.concatenate(parts, axis=-1)
        total = total + (jnp.flip(out, spatial) if axes else out)
    return total / len(flips)


def make_window_predictor(graphdef, mesh, *, output: str, mirror_axes=(), attention_stages=()):
    """predict(params, windows) for sliding_window: windows (B, *window, 4) numpy -> window_outputs
    as numpy, the B windows split over the mesh's data axis (B a multiple of its size; with several
    processes every process passes the same windows). Jitted once; compiled once per window shape."""
    from segguided_jax import sharding

    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    fn = jax.jit(functools.partial(window_outputs, graphdef, output=output, mirror_axes=tuple(mirror_axes),
                                   attention_stages=tuple(attention_stages)),
                 in_shardings=(replicated, batch), out_shardings=replicated)
    return lambda params, x: np.asarray(fn(params, jax.device_put(x, batch)))


def remove_small_et(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Internal labels (X, Y, Z) -> a copy in which every ET (3) connected component (26-
    connectivity) of fewer than min_voxels voxels is NCR (1): tiny enhancing specks are mostly
    false positives, and relabelling them keeps the tumour core intact. min_voxels <= 1: no-op."""
    labels = labels.copy()
    if min_voxels <= 1:
        return labels
    components, n = ndimage.label(labels == 3, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return labels
    sizes = np.bincount(components.ravel())
    small = sizes < min_voxels
    small[0] = False
    labels[small[components]] = 1
    return labels


def probabilities_to_labels(region_probs: np.ndarray, threshold: float, min_et_voxels: int) -> np.ndarray:
    """ET/TC/WT probabilities (..., 3) -> internal labels: threshold, nest the regions the nnU-Net
    way (regions_to_labels), then turn ET specks smaller than min_et_voxels into NCR."""
    return remove_small_et(regions_to_labels(region_probs[..., :3] > threshold), min_et_voxels)


def sliding_window(predict_batch, image: np.ndarray, window, overlap: float, batch_size: int) -> np.ndarray:
    """Whole-volume prediction from windows.

    predict_batch: (batch_size, *window, C) float32 -> (batch_size, *window, K); called with a
      fixed batch size (the last batch is padded) so it compiles once per window shape.
    image: (X, Y, Z, C). Returns (X, Y, Z, K) float32, the Gaussian-weighted mean of the windows.
    """
    window = tuple(int(w) for w in window)
    shape = image.shape[:3]
    pad = [(0, max(w - s, 0)) for s, w in zip(shape, window)]
    padded = np.pad(image, pad + [(0, 0)]) if any(p[1] for p in pad) else image
    weights = gaussian_weights(window)
    starts = window_starts(padded.shape[:3], window, overlap)
    acc = norm = None
    for b in range(0, len(starts), batch_size):
        chunk = starts[b: b + batch_size]
        batch = np.zeros((batch_size,) + window + (image.shape[-1],), np.float32)
        for i, (x, y, z) in enumerate(chunk):
            batch[i] = padded[x: x + window[0], y: y + window[1], z: z + window[2]]
        out = np.asarray(predict_batch(batch), np.float32)
        if acc is None:
            acc = np.zeros(padded.shape[:3] + (out.shape[-1],), np.float32)
            norm = np.zeros(padded.shape[:3], np.float32)
        for i, (x, y, z) in enumerate(chunk):
            sl = (slice(x, x + window[0]), slice(y, y + window[1]), slice(z, z + window[2]))
            acc[sl] += out[i] * weights[..., None]
            norm[sl] += weights
    probs = acc / norm[..., None]
    return probs[: shape[0], : shape[1], : shape[2]]
