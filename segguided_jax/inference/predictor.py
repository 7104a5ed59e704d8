"""Whole-volume inference: Gaussian-weighted sliding windows (the nnU-Net scheme), mirroring
test-time augmentation, attention maps; one `VolumePredictor` for validation, sweeps and predict.

Windows are placed so that neighbours overlap by at least `overlap` of the window, evenly spread
from edge to edge; each window's output is weighted by a Gaussian centred on the window (sigma =
window / 8), so that predictions near window borders, which see less context, count less. The
volume, the windows and the weighted sums stay on the devices: the host only loops over batches of
window positions (one compiled network call per batch, its windows split over the mesh's data axis).
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from segguided_jax.parallel import sharding


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


def mirror_sets(axes) -> list[tuple]:
    """Every subset of the spatial axes to mirror for test-time augmentation (2**len(axes) sets)."""
    axes = tuple(axes)
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2 ** len(axes))]


def mirrored_outputs(forward, params, x, *, mirror_axes=(), attention_stages=()):
    """Per-voxel outputs of a batch of windows x (N, D, H, W, 4) from a window function.

    forward(params, x) -> (probabilities (N, D, H, W, 3) float32 ET/TC/WT, maps): maps holds one
    (N, d, h, w, 3) float32 array of NCR/ED/ET attention maps in [0, 1] per decoder stage, coarsest
    first (segguided_jax.models.network.forward, or the same function read back from an exported
    model). Returns (N, D, H, W, 3 + 3·[attention_stages non-empty]) float32: the probabilities,
    then (if asked) the maps averaged over the chosen decoder stages (indices into the
    coarsest-first stage list, e.g. -1 = finest), each resized to the window by trilinear
    interpolation. With mirror_axes (spatial axes 0..2), the outputs are the mean over every
    combination of mirrored axes (up to 8 passes), each mirrored back.
    """
    total = 0.0
    flips = mirror_sets(mirror_axes)
    for axes in flips:
        spatial = tuple(a + 1 for a in axes)
        xi = jnp.flip(x, spatial) if axes else x
        probabilities, stage_maps = forward(params, xi)
        parts = [probabilities]
        if attention_stages:
            maps = [jax.image.resize(stage_maps[s], probabilities.shape[:4] + (stage_maps[s].shape[-1],), "trilinear")
                    for s in attention_stages]
            parts.append(sum(maps) / len(maps))
        out = jnp.concatenate(parts, axis=-1)
        total = total + (jnp.flip(out, spatial) if axes else out)
    return total / len(flips)


def window_outputs(graphdef, params, x, *, output: str, mirror_axes=(), attention_stages=()):
    """mirrored_outputs of the network (graphdef, params) whose head is `output` ("regions" or
    "labels")."""
    from segguided_jax.models.network import forward  # the model stack, only where a network is given

    return mirrored_outputs(functools.partial(forward, graphdef, output=output), params, x,
                            mirror_axes=mirror_axes, attention_stages=attention_stages)


@functools.partial(jax.jit, static_argnames=("window",))
def _gather(volume, starts, *, window):
    """(B, *window, C) windows of volume (X, Y, Z, C) at starts (B, 3)."""
    size = window + (volume.shape[-1],)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(volume, (s[0], s[1], s[2], 0), size))(starts)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(acc, norm, outputs, starts, valid, gauss):
    """Adds each window's output weighted by gauss (*window) into acc (X, Y, Z, K) and the weight
    into norm (X, Y, Z); valid (B,) is 0 for the padding windows of the last batch."""
    def body(i, carry):
        acc, norm = carry
        s = starts[i]
        corner = (s[0], s[1], s[2])
        w = gauss * valid[i]
        part = jax.lax.dynamic_slice(acc, corner + (0,), outputs.shape[1:])
        acc = jax.lax.dynamic_update_slice(acc, part + outputs[i] * w[..., None], corner + (0,))
        part = jax.lax.dynamic_slice(norm, corner, w.shape)
        norm = jax.lax.dynamic_update_slice(norm, part + w, corner)
        return acc, norm

    return jax.lax.fori_loop(0, starts.shape[0], body, (acc, norm))


@jax.jit
def _normalise(acc, norm):
    return acc / norm[..., None]


def window_function(forward, mesh, *, mirror_axes=(), attention_stages=()):
    """mirrored_outputs of forward(params, windows) jitted for a mesh: (params, windows (B, D, H,
    W, 4)) -> outputs, the parameters replicated, the windows split over the mesh's data axis (and
    their first spatial axis over its spatial axis). The one form every prediction runs, and the
    one compile_check compiles.

    Equal arguments give the same jitted function, so a process traces and compiles a network's
    window step once however many VolumePredictors it makes (training one per run, a sweep one per
    run and validation and evaluation). `forward` counts as equal when it is a functools.partial
    of the same function with equal arguments (network.forward with equal graphdefs: the same
    network)."""
    return _shared_window_function(_Forward(forward), mesh, tuple(mirror_axes), tuple(attention_stages))


class _Forward:
    """A forward function compared by value when it is a functools.partial with hashable
    arguments, else by identity."""

    def __init__(self, fn):
        self.fn = fn
        self.key = fn
        if isinstance(fn, functools.partial):
            key = (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
            try:
                hash(key)
                self.key = key
            except TypeError:
                pass

    def __eq__(self, other):
        return isinstance(other, _Forward) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


@functools.lru_cache(maxsize=16)
def _shared_window_function(forward: _Forward, mesh, mirror_axes, attention_stages):
    return jax.jit(functools.partial(mirrored_outputs, forward.fn, mirror_axes=mirror_axes,
                                     attention_stages=attention_stages),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.batch_sharding(mesh))


def sliding_window(predict_windows, image: np.ndarray, window, overlap: float, batch_size: int,
                   batch_sharding=None, replicated=None) -> np.ndarray:
    """Whole-volume prediction from windows, accumulated on the devices.

    predict_windows: jax.Array (batch_size, *window, C) -> jax.Array (batch_size, *window, K), e.g.
      a jitted network; always called with batch_size windows (the last batch is padded), so it
      compiles once per window shape.
    image: (X, Y, Z, C) numpy. Returns (X, Y, Z, K) float32 numpy, the Gaussian-weighted mean of
    the windows. batch_sharding / replicated: where windows and the volume live (default: the
    default device); with several processes every process passes the same image.
    """
    window = tuple(int(w) for w in window)
    shape = image.shape[:3]
    pad = [(0, max(w - s, 0)) for s, w in zip(shape, window)]
    padded = np.pad(image, pad + [(0, 0)]) if any(p[1] for p in pad) else image
    starts = np.asarray(window_starts(padded.shape[:3], window, overlap), np.int32)
    n = len(starts)
    total = -(-n // batch_size) * batch_size
    starts = np.concatenate([starts, np.repeat(starts[-1:], total - n, 0)])  # padding windows: weight 0
    place = (lambda a: jax.device_put(a, replicated)) if replicated is not None else jnp.asarray
    volume = place(np.asarray(padded, np.float32))
    gauss = place(gaussian_weights(window))
    acc = norm = None
    for b in range(0, total, batch_size):
        chunk = starts[b: b + batch_size]
        windows = _gather(volume, place(chunk), window=window)
        if batch_sharding is not None:
            windows = jax.device_put(windows, batch_sharding)
        out = predict_windows(windows)
        if acc is None:
            acc = place(np.zeros(padded.shape[:3] + (out.shape[-1],), np.float32))
            norm = place(np.zeros(padded.shape[:3], np.float32))
        valid = (np.arange(b, b + batch_size) < n).astype(np.float32)
        acc, norm = _accumulate(acc, norm, out, place(chunk), place(valid), gauss)
    probs = np.asarray(_normalise(acc, norm))
    return probs[: shape[0], : shape[1], : shape[2]]


class VolumePredictor:
    """The network over whole volumes: (X, Y, Z, 4) float32 preprocessed image -> (X, Y, Z, 3 [+ 3])
    float32: ET/TC/WT region probabilities [+ NCR/ED/ET attention maps].

    One jitted window function for its lifetime (compiled once per window shape), its windows spread
    over the mesh's data axis (and split along the first spatial axis over the spatial axis). With
    several processes every process calls it with the same image and gets the same result.
    Validation during training, sweeps and the predict CLI all predict through this class.
    """

    def __init__(self, forward, params, mesh, *, window, overlap: float, batch_size: int, mirror_axes=(),
                 attention_stages=()):
        """forward(params, windows) -> (probabilities, per-stage attention maps): see mirrored_outputs."""
        self.mesh = mesh
        self.window = tuple(int(w) for w in window)
        self.overlap = float(overlap)
        data = mesh.shape[sharding.DATA_AXIS]
        self.batch_size = -(-int(batch_size) // data) * data  # a whole number of windows per device
        self.mirror_axes = tuple(mirror_axes)
        self.attention_stages = tuple(attention_stages)
        self._replicated, self._batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        self._fn = window_function(forward, mesh, mirror_axes=self.mirror_axes,
                                   attention_stages=self.attention_stages)
        self.params = params
        self.set_params(params)

    def set_params(self, params) -> None:
        """Predicts with these parameters from now on (e.g. the train state's, at each validation)."""
        self.params = jax.device_put(params, self._replicated)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return sliding_window(lambda w: self._fn(self.params, w), image, self.window, self.overlap,
                              self.batch_size, self._batch, self._replicated)


def predict_and_score(predictor, post, source, score, progress=None) -> list:
    """Predicts, post-processes and scores every case of `source`, in order: the one loop of
    validation during training and of the sweep's test evaluation.

    predictor: a VolumePredictor (or any image -> outputs function). post: a
    postprocess.PostProcessing. source: a data.records.CaseSource (its cases' metadata, decoded
    cases with "image" and "label", its manifest). Each case is predicted on the preprocessed grid,
    whose voxel size is the manifest's target_spacing, else the case's own; then
    score(meta, case, outputs, labels, spacing) -> that case's result, and progress(meta, index)
    if given. Returns the results."""
    target = source.manifest.get("target_spacing")
    results = []
    for i, meta in enumerate(source.cases):
        case = source[i]
        spacing = target or meta["spacing"]
        outputs = predictor(case["image"])
        results.append(score(meta, case, outputs, post.labels(outputs, spacing), spacing))
        if progress is not None:
            progress(meta, i)
    return results
