"""nnU-Net-style 3D data augmentation in numpy and scipy.ndimage, in float32.

Two entry points:
- `augment(image, label, rng, cfg)`: one patch in, one augmented patch of the same shape out
  (rotation and scaling resample the patch itself, 0 outside it).
- The training pipeline (segguided_jax.data.transforms) instead draws the spatial transform with
  `draw_spatial`, resamples the final patch's voxels straight from the whole case with `resample`
  (so rotation and scaling draw real tissue, not the zeros beyond a final-size crop), then calls
  `augment_intensity` and `mirror_channels_last`.
Arrays in and out: image (X, Y, Z, C) float32 channels last, label (X, Y, Z) uint8 (values 0..3).
In between the image is channels first, (C, X, Y, Z), so that each channel is one contiguous
volume: per-channel numpy and scipy work on strided channels-last views is several times slower.
Every random number comes from the `rng` given (the pipeline derives it from its seed and the
position in the stream).

The order, the sampling and the defaults follow nnU-Net v2's `nnUNetTrainer.get_training_transforms`
(MIC-DKFZ/nnUNet, nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py, read at commit 017de4ad) and
the batchgeneratorsv2 transforms it builds:

    rotation + scaling (one resampling) -> [bias field] -> Gaussian noise -> Gaussian blur ->
    brightness -> contrast -> low resolution -> gamma on the inverted image -> gamma -> mirroring

The bias field is not nnU-Net's (off in its defaults): MONAI's RandBiasField, a smooth
multiplicative field exp(sum of Legendre products P_i(x) P_j(y) P_k(z), i + j + k <= 3) over the
patch's [-1, 1]³, one field for all channels, the 20 coefficients uniform in
bias_field_coeff_range; it is drawn last of the intensity draws, and only where its probability is
above 0, so that configs without it draw exactly what they drew before.

`cfg` (an ml_collections.ConfigDict, under `config.data.augment`; `default_augment_config()` gives
nnU-Net's values). Each `*_probability` without "per_channel" is drawn once per sample:

    rotation_probability             rotate, all three axes at once
    rotation_max_degrees             each axis' angle is uniform in [-max, +max]
    scale_probability                scale, one isotropic factor
    scale_range                      (lo, hi) uniform. As in nnU-Net the factor scales the sampling
                                     grid: > 1 zooms out (structures get smaller), < 1 zooms in
    mirror_probability               per spatial axis, independently
    gamma_probability                gamma on each channel (exponent per channel)
    gamma_invert_probability         an extra gamma pass on the negated channel (brightens dark
                                     values instead of bright ones); runs before the plain pass,
                                     each pass drawn independently, as nnU-Net's two transforms
    gamma_range                      (lo, hi), drawn like nnU-Net's BGContrast (see bg_contrast)
    gamma_retain_stats               restore each channel's mean and std after gamma (nnU-Net: yes)
    brightness_probability           multiply each channel by its own factor
    brightness_range                 (lo, hi), BGContrast-drawn
    contrast_probability             scale each channel about its mean, clipped to its old range
    contrast_range                   (lo, hi), BGContrast-drawn
    noise_probability                add Gaussian noise, one field shared by all channels
    noise_std                        its standard deviation is uniform in [0, noise_std]
    blur_probability                 Gaussian blur, then per channel:
    blur_per_channel_probability     ... blur this channel, with a sigma per axis ...
    blur_sigma_range                 ... each uniform in (lo, hi) voxels
    lowres_probability               simulate low resolution, then per channel:
    lowres_per_channel_probability   ... downsample this channel (nearest) by a zoom ...
    lowres_zoom_range                ... uniform in (lo, hi), same on all axes, then upsample back
                                     (linear) to the exact original shape
    bias_field_probability           multiply every channel by one smooth field (MONAI's
                                     RandBiasField; 0 in nnU-Net's defaults)
    bias_field_coeff_range           (lo, hi): each Legendre coefficient uniform in it (MONAI: 0, 0.1)

Choices and differences from nnU-Net, on purpose:
- The image is resampled with order 1 (trilinear), as nnU-Net v2 does (torch grid_sample
  'bilinear'); labels with order 0 (nearest), so they keep their values (nnU-Net v2 resamples
  one-hot masks linearly instead). Points outside the source get 0 (image and label), as
  scipy.ndimage's mode 'constant': a point counts as inside on [0, n - 1] per axis.
- Scaling without rotation is separable and is resampled axis by axis (the same trilinear values,
  a fraction of the cost); rotations go through scipy.ndimage.affine_transform.
- Noise: the nnU-Net paper says "variance drawn from U(0, 0.1)", but its code passes that number to
  np.random.normal as the standard deviation (batchgeneratorsv2 GaussianNoiseTransform); we follow
  the code: `noise_std` = 0.1, the std uniform in [0, 0.1].
- Low resolution follows batchgeneratorsv2 (torch `interpolate`): shape round(n * zoom), 'nearest-
  exact' down, linear with half-voxel centres (align_corners=False) up.
- Intensity transforms act on the whole patch, background included, like nnU-Net: brightness keeps
  0 at 0, but noise, blur, contrast, gamma and low resolution can move background voxels away from
  exactly 0. Nothing re-masks them.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
import numpy as np
from scipy import ndimage

# The bias field's polynomial degree (MONAI's RandBiasField default): 20 coefficients in 3D.
BIAS_FIELD_DEGREE = 3
BIAS_FIELD_TERMS = tuple((i, j, k) for i in range(BIAS_FIELD_DEGREE + 1) for j in range(BIAS_FIELD_DEGREE + 1)
                         for k in range(BIAS_FIELD_DEGREE + 1) if i + j + k <= BIAS_FIELD_DEGREE)

# Interpolation orders; see the module docstring for why.
_IMAGE_ORDER = 1
_LABEL_ORDER = 0


def default_augment_config() -> ml_collections.ConfigDict:
    """nnU-Net v2's default 3D augmentation (nnUNetTrainer.get_training_transforms and
    configure_rotation_dummyDA_mirroring_and_inital_patch_size, nnunetv2 at commit 017de4ad)."""
    c = ml_collections.ConfigDict()
    # SpatialTransform(p_rotation=0.2, rotation=±30° for isotropic 3D patches, p_scaling=0.2,
    # scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1)
    c.rotation_probability = 0.2
    c.rotation_max_degrees = 30.0
    c.scale_probability = 0.2
    c.scale_range = (0.7, 1.4)
    # MirrorTransform(allowed_axes=(0, 1, 2)): each axis with probability 0.5
    c.mirror_probability = 0.5
    # GammaTransform(BGContrast((0.7, 1.5)), p_invert_image=1, p_retain_stats=1), apply_probability=0.1
    # GammaTransform(BGContrast((0.7, 1.5)), p_invert_image=0, p_retain_stats=1), apply_probability=0.3
    c.gamma_probability = 0.3
    c.gamma_invert_probability = 0.1
    c.gamma_range = (0.7, 1.5)
    c.gamma_retain_stats = True
    # MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), per channel), apply_probability=0.15
    c.brightness_probability = 0.15
    c.brightness_range = (0.75, 1.25)
    # ContrastTransform(BGContrast((0.75, 1.25)), preserve_range=True, per channel), apply_probability=0.15
    c.contrast_probability = 0.15
    c.contrast_range = (0.75, 1.25)
    # GaussianNoiseTransform(noise_variance=(0, 0.1), synchronize_channels=True), apply_probability=0.1;
    # the code draws the number as a standard deviation (see the module docstring)
    c.noise_probability = 0.1
    c.noise_std = 0.1
    # GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_axes=False, p_per_channel=0.5),
    # apply_probability=0.2
    c.blur_probability = 0.2
    c.blur_per_channel_probability = 0.5
    c.blur_sigma_range = (0.5, 1.0)
    # SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_axes=True, p_per_channel=0.5),
    # apply_probability=0.25
    c.lowres_probability = 0.25
    c.lowres_per_channel_probability = 0.5
    c.lowres_zoom_range = (0.5, 1.0)
    # Not nnU-Net's: MONAI's RandBiasField(degree=3, coeff_range=(0.0, 0.1)), off here.
    c.bias_field_probability = 0.0
    c.bias_field_coeff_range = (0.0, 0.1)
    return c


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, cfg) -> tuple[np.ndarray, np.ndarray]:
    """One random nnU-Net-style augmentation of a patch.

    image: (X, Y, Z, C) float32, channels last; label: (X, Y, Z) integer (uint8, values 0..3).
    Returns (image, label): new C-contiguous arrays of the input shapes, float32 and label's dtype.
    Rotation and scaling turn about the patch's centre and read 0 outside it.
    """
    if image.ndim != 4 or image.shape[:3] != label.shape:
        raise ValueError(f"augment wants image (X, Y, Z, C) and label (X, Y, Z); got {image.shape} and {label.shape}")
    label_dtype = label.dtype
    image = np.asarray(image, np.float32)
    shape = label.shape
    matrix = draw_spatial(rng, cfg)
    centre = (np.asarray(shape, np.float64) - 1) / 2
    img, lab = resample(lambda lo, hi: [image[_box(lo, hi) + (c,)] for c in range(image.shape[-1])], label, shape,
                        matrix, centre, shape)
    augment_intensity(img, rng, cfg)
    img, lab = mirror_channels_last(img, lab, rng, cfg)
    return img, lab.astype(label_dtype, copy=False)


def initial_patch_size(patch, cfg) -> tuple[int, ...]:
    """Edge lengths (voxels) of the box that holds every voxel the final `patch` may read under the
    configured rotation and scaling: nnU-Net's get_patch_size (each axis' largest rotation on its
    own, the patch's extent vector rotated, elementwise max) times the largest zoom-out factor.
    Equals `patch` when neither rotation nor scaling can happen. Combined rotations about several
    axes may reach a little further; those voxels read the case itself on the CPU path and 0 on
    the accelerator path (as nnU-Net's enlarged crop)."""
    extent = np.asarray(patch, np.float64)
    out = extent.copy()
    if cfg.rotation_probability > 0 and cfg.rotation_max_degrees > 0:
        a = math.radians(min(cfg.rotation_max_degrees, 90.0))
        for axis in range(3):
            angles = [0.0, 0.0, 0.0]
            angles[axis] = a
            out = np.maximum(out, np.abs(affine_matrix(angles, 1.0) @ extent))
    if cfg.scale_probability > 0:
        out = out * max(1.0, float(cfg.scale_range[1]))
    return tuple(int(math.ceil(v - 1e-6)) for v in out)


def draw_spatial(rng: np.random.Generator, cfg) -> np.ndarray | None:
    """The (3, 3) output-to-input matrix of a random rotation + scaling, or None (no spatial
    transform drawn). Draws in nnU-Net's order: rotate?, scale?, three angles, one factor."""
    do_rotate = rng.random() < cfg.rotation_probability
    do_scale = rng.random() < cfg.scale_probability
    if not (do_rotate or do_scale):
        return None
    max_rad = math.radians(cfg.rotation_max_degrees)
    angles = rng.uniform(-max_rad, max_rad, size=3) if do_rotate else np.zeros(3)
    scale = rng.uniform(*cfg.scale_range) if do_scale else 1.0
    return affine_matrix(angles, scale)


def affine_matrix(angles_rad, scale: float) -> np.ndarray:
    """(3, 3) matrix Rz @ Ry @ Rx @ (scale * I), nnU-Net's composition (create_affine_matrix_3d).

    angles_rad[i] rotates in the plane of the two axes other than i. Used as the map from output to
    input coordinates (see resample), so scale > 1 shows more of the input: a zoom out."""
    ax, ay, az = (float(a) for a in angles_rad)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx @ (float(scale) * np.eye(3))


def source_points(matrix: np.ndarray | None, centre, patch) -> Callable:
    """The map from output voxel p (..., 3) of a `patch`-sized output to its source point:
    matrix @ (p - (patch - 1) / 2) + centre (identity matrix when None)."""
    m = np.eye(3) if matrix is None else np.asarray(matrix, np.float64)
    half = (np.asarray(patch, np.float64) - 1) / 2
    c = np.asarray(centre, np.float64)
    return lambda p: (np.asarray(p, np.float64) - half) @ m.T + c


def resample(read_box: Callable, label: np.ndarray | None, shape, matrix: np.ndarray | None, centre,
             patch) -> tuple[np.ndarray, np.ndarray | None]:
    """The `patch`-sized output whose voxel p shows the source at matrix @ (p - (patch - 1) / 2) +
    centre: one resampling of only the output's voxels.

    read_box(lo, hi) -> C float32 arrays (hi - lo): the source image's box channel by channel
    (0 <= lo <= hi <= shape; records.Case.channel_boxes);
    label: the source's (X, Y, Z) uint8 labels or None; shape: the source's (X, Y, Z);
    matrix: (3, 3) or None for the identity; centre: (3,) source point under the output's centre.
    Image linear, labels nearest; 0 outside the source. Identity with an integer start is a crop;
    a diagonal matrix goes axis by axis; anything else through ndimage.affine_transform.
    Returns image (C, P, P, P) float32, channels FIRST (what augment_intensity and
    mirror_channels_last take), and label (P, P, P) uint8 (None without a label): new
    C-contiguous arrays."""
    patch = tuple(int(p) for p in patch)
    shape = tuple(int(s) for s in shape)
    to_source = source_points(matrix, centre, patch)
    corners = to_source(_corners(patch))
    lo = np.clip(np.floor(corners.min(0)).astype(int), 0, shape)
    hi = np.maximum(np.clip(np.floor(corners.max(0)).astype(int) + 2, 0, shape), lo)
    region = read_box(lo, hi)
    channels = len(region)
    out = np.zeros((channels,) + patch, np.float32)
    out_label = None if label is None else np.zeros(patch, np.uint8)
    if region[0].size == 0:  # the whole patch lies outside the source
        return out, out_label
    label_region = None if label is None else label[_box(lo, hi)]
    diagonal = matrix is None or not np.any(matrix - np.diag(np.diagonal(matrix)))
    start = to_source(np.zeros(3)) - lo  # region coordinates of output voxel 0
    if diagonal:
        steps = np.ones(3) if matrix is None else np.diagonal(matrix)
        axes = [start[a] + steps[a] * np.arange(patch[a]) for a in range(3)]
        if matrix is None and np.all(start == np.round(start)):
            for c in range(channels):
                _crop_into(out[c], region[c], start.astype(int))
            if out_label is not None:
                _crop_into(out_label, label_region, start.astype(int))
        else:
            weights = [_linear_weights(x, n) for x, n in zip(axes, region[0].shape)]
            for c in range(channels):
                out[c] = _separable_linear(region[c], weights)
            if out_label is not None:
                out_label[...] = _separable_nearest(label_region, axes)
        return out, out_label
    # ndimage maps output index o to input matrix @ o + offset.
    for c in range(channels):
        ndimage.affine_transform(region[c], matrix, offset=start, output_shape=patch, order=_IMAGE_ORDER,
                                 mode="constant", cval=0.0, output=out[c])
    if out_label is not None:
        ndimage.affine_transform(label_region, matrix, offset=start, output_shape=patch, order=_LABEL_ORDER,
                                 mode="constant", cval=0, output=out_label)
    return out, out_label


def augment_intensity(img: np.ndarray, rng: np.random.Generator, cfg) -> None:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma and gamma, in place on
    img (C, X, Y, Z) float32, channels first (nnU-Net's order and probabilities; see the module
    docstring)."""
    apply_intensity(img, draw_intensity(rng, cfg, img.shape[0], noise_shape=img.shape[1:]), cfg)


def draw_intensity(rng: np.random.Generator, cfg, n_channels: int, noise_shape=None) -> dict:
    """The random draws of the intensity transforms for n_channels channels, in nnU-Net's order:
    {"noise": None or (std, field), "blur": per channel None or (3,) sigmas, "brightness",
    "contrast", "gamma_invert", "gamma": None or a factor/exponent per channel, "lowres": per
    channel None or a zoom, "bias": None or the bias field's coefficients}; None where a transform
    is not drawn. noise_shape: the (X, Y, Z) of the
    noise field; None draws instead one integer in [0, 2**24) from which the accelerator draws the
    field (segguided_jax.data.device_augment), so the draws after it differ from the CPU path's."""
    d = {"noise": None, "blur": [None] * n_channels, "brightness": None, "contrast": None,
         "lowres": [None] * n_channels, "gamma_invert": None, "gamma": None}
    if rng.random() < cfg.noise_probability:
        std = rng.uniform(0.0, cfg.noise_std)
        field = (rng.standard_normal(noise_shape, dtype=np.float32) if noise_shape is not None
                 else int(rng.integers(2 ** 24)))
        d["noise"] = (std, field)
    if rng.random() < cfg.blur_probability:
        for c in range(n_channels):
            if rng.random() < cfg.blur_per_channel_probability:
                d["blur"][c] = rng.uniform(*cfg.blur_sigma_range, size=3)
    if rng.random() < cfg.brightness_probability:
        d["brightness"] = [bg_contrast(cfg.brightness_range, rng) for _ in range(n_channels)]
    if rng.random() < cfg.contrast_probability:
        d["contrast"] = [bg_contrast(cfg.contrast_range, rng) for _ in range(n_channels)]
    if rng.random() < cfg.lowres_probability:
        for c in range(n_channels):
            if rng.random() < cfg.lowres_per_channel_probability:
                d["lowres"][c] = rng.uniform(*cfg.lowres_zoom_range)
    for key, probability in (("gamma_invert", cfg.gamma_invert_probability), ("gamma", cfg.gamma_probability)):
        if rng.random() < probability:
            d[key] = [bg_contrast(cfg.gamma_range, rng) for _ in range(n_channels)]
    d["bias"] = None
    bias = cfg.get("bias_field_probability", 0.0)
    if bias > 0 and rng.random() < bias:  # nothing drawn at 0: configs without it keep their draws
        d["bias"] = rng.uniform(*cfg.bias_field_coeff_range, size=len(BIAS_FIELD_TERMS))
    return d


def bias_field(shape, coefficients) -> np.ndarray:
    """exp(sum over BIAS_FIELD_TERMS (i, j, k) of c * P_i(x) P_j(y) P_k(z)) on a (X, Y, Z) grid of
    [-1, 1]³ (np.linspace per axis), float32: MONAI's RandBiasField field."""
    cube = np.zeros((BIAS_FIELD_DEGREE + 1,) * 3)
    for (i, j, k), c in zip(BIAS_FIELD_TERMS, coefficients):
        cube[i, j, k] = c
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return np.exp(np.polynomial.legendre.leggrid3d(*axes, cube)).astype(np.float32)


def apply_intensity(img: np.ndarray, d: dict, cfg) -> None:
    """The intensity transforms drawn by draw_intensity (with a noise field), in place on img
    (C, X, Y, Z) float32."""
    if d.get("bias") is not None:
        img *= bias_field(img.shape[1:], d["bias"])
    if d["noise"] is not None:
        std, noise = d["noise"]
        noise *= np.float32(std)
        img += noise
    for c, sigmas in enumerate(d["blur"]):
        if sigmas is not None:
            ndimage.gaussian_filter(img[c], sigmas, output=img[c])
    for c, factor in enumerate(d["brightness"] or ()):
        img[c] *= np.float32(factor)
    for c, factor in enumerate(d["contrast"] or ()):
        contrast(img[c], factor)
    for c, zoom in enumerate(d["lowres"]):
        if zoom is not None:
            img[c] = simulate_low_resolution(img[c], zoom)
    for key, invert in (("gamma_invert", True), ("gamma", False)):
        for c, exponent in enumerate(d[key] or ()):
            gamma(img[c], exponent, invert=invert, retain_stats=cfg.gamma_retain_stats)


def draw_mirror(rng: np.random.Generator, cfg) -> tuple[int, ...]:
    """The spatial axes to flip, each with probability cfg.mirror_probability."""
    return tuple(a for a in range(3) if rng.random() < cfg.mirror_probability)


def mirror_channels_last(img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, cfg, out=None):
    """Flips img (C, X, Y, Z) and label (X, Y, Z) along each spatial axis with probability
    cfg.mirror_probability, and moves the channels last. Returns (image (X, Y, Z, C) float32,
    label): the image written into `out` when given (else a new array), the label C-contiguous."""
    axes = draw_mirror(rng, cfg)
    if out is None:
        out = np.empty(img.shape[1:] + img.shape[:1], np.float32)
    for c in range(img.shape[0]):  # channel by channel: faster than one transposing copy
        out[..., c] = np.flip(img[c], axes) if axes else img[c]
    if label is not None and axes:
        label = np.ascontiguousarray(np.flip(label, axes))
    return out, label


def contrast(channel: np.ndarray, factor: float) -> np.ndarray:
    """In place: (x - mean) * factor + mean, clipped to the channel's old [min, max] (nnU-Net's
    ContrastTransform with preserve_range=True); mean over the whole channel. Returns channel."""
    mean, lo, hi = np.float32(channel.mean()), channel.min(), channel.max()
    channel -= mean
    channel *= np.float32(factor)
    channel += mean
    np.clip(channel, lo, hi, out=channel)
    return channel


def gamma(channel: np.ndarray, exponent: float, *, invert: bool = False, retain_stats: bool = True) -> np.ndarray:
    """In place, nnU-Net's GammaTransform on one float32 channel: rescale to [0, 1] by its min and
    max, raise to `exponent`, rescale back. invert=True does it on -channel and negates the result;
    retain_stats restores the channel's mean and std afterwards. Returns channel."""
    x = channel
    if invert:
        np.negative(x, out=x)
    if retain_stats:
        mean, std = float(x.mean()), float(x.std())
    lo = float(x.min())
    span = max(float(x.max()) - lo, 1e-7)
    x -= np.float32(lo)
    x *= np.float32(1.0 / span)
    np.clip(x, 0.0, 1.0, out=x)  # float rounding must not hand power() a value outside [0, 1]
    np.power(x, np.float32(exponent), out=x)
    if retain_stats:
        # (y * span + lo - its mean) * std / its std + mean, with y the powered [0, 1] values
        y_mean, y_std = float(x.mean()), float(x.std())
        x -= np.float32(y_mean)
        x *= np.float32(span * std / max(y_std * span, 1e-7))
        x += np.float32(mean)
    else:
        x *= np.float32(span)
        x += np.float32(lo)
    if invert:
        np.negative(x, out=x)
    return x


def simulate_low_resolution(channel: np.ndarray, zoom: float) -> np.ndarray:
    """(X, Y, Z) -> the same shape, float32: downsampled to round(n * zoom) per axis by nearest
    neighbour, then upsampled back linearly (torch 'nearest-exact' and 'trilinear' with
    align_corners=False, as batchgeneratorsv2's SimulateLowResolutionTransform)."""
    shape = channel.shape
    small_shape = [max(int(round(n * zoom)), 1) for n in shape]
    if list(small_shape) == list(shape):
        return np.asarray(channel, np.float32)
    small = channel
    for axis, (n, m) in enumerate(zip(shape, small_shape)):
        idx = np.minimum(np.floor((np.arange(m) + 0.5) * (n / m)).astype(np.intp), n - 1)
        small = small.take(idx, axis=axis)
    out = small
    for axis, (n, m) in enumerate(zip(shape, small_shape)):
        src = np.maximum((np.arange(n) + 0.5) * (m / n) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.intp), m - 1)
        i1 = np.minimum(i0 + 1, m - 1)
        w = (src - i0).astype(np.float32)
        out = _lerp(out.take(i0, axis=axis), out.take(i1, axis=axis), w, axis)
    return out.astype(np.float32, copy=False)


def _lerp(a, b, w, axis):
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return a + (b - a) * w


def _linear_weights(x: np.ndarray, n: int):
    """Linear interpolation of an axis of length n at coordinates x: (i0, i1, w0, w1), with both
    weights 0 where x is outside [0, n - 1] (mode 'constant')."""
    valid = (x >= 0) & (x <= n - 1)
    i0 = np.clip(np.floor(x).astype(np.intp), 0, max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = np.where(valid, x - i0, 0.0).astype(np.float32)
    w0 = np.where(valid, 1.0 - (x - i0), 0.0).astype(np.float32)
    return i0, i1, w0, w1


def _separable_linear(region: np.ndarray, weights) -> np.ndarray:
    """region (X, Y, Z) sampled on a grid given per axis by _linear_weights: linear per axis (the
    same values as trilinear), the axis that shrinks most first."""
    out = region
    order = sorted(range(3), key=lambda a: len(weights[a][0]) / region.shape[a])
    for axis in order:
        i0, i1, w0, w1 = weights[axis]
        shape = [1] * 3
        shape[axis] = -1
        a = out.take(i0, axis=axis)
        a *= w0.reshape(shape)
        b = out.take(i1, axis=axis)
        b *= w1.reshape(shape)
        a += b
        out = a
    return out


def _separable_nearest(region: np.ndarray, axes) -> np.ndarray:
    """region (X, Y, Z) at the grid axes[0] x axes[1] x axes[2]: nearest (ties round up, as
    ndimage's order 0), 0 where a coordinate is outside [0, n - 1]."""
    idx, valid = [], []
    for axis, x in enumerate(axes):
        n = region.shape[axis]
        valid.append((x >= 0) & (x <= n - 1))
        idx.append(np.clip(np.floor(x + 0.5).astype(np.intp), 0, n - 1))
    out = region[np.ix_(*idx)]
    return np.where(valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :], out, 0).astype(region.dtype)


def _crop_into(out: np.ndarray, source: np.ndarray, start) -> None:
    """out[p] = source[p + start] where that lies inside source; the rest of out untouched."""
    src, dst = [], []
    for s, n, p in zip(start, source.shape, out.shape):
        a, b = max(s, 0), min(s + p, n)
        if a >= b:
            return
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = source[tuple(src)]


def _corners(patch) -> np.ndarray:
    return np.array([[i, j, k] for i in (0, patch[0] - 1) for j in (0, patch[1] - 1) for k in (0, patch[2] - 1)],
                    np.float64)


def _box(lo, hi) -> tuple:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def bg_contrast(value_range, rng: np.random.Generator) -> float:
    """nnU-Net's BGContrast draw: with probability 0.5 (when lo < 1) uniform in (lo, 1), otherwise
    uniform in (max(lo, 1), hi), so shrinking and growing are equally likely for ranges like
    (0.75, 1.25) and (0.7, 1.5)."""
    lo, hi = value_range
    if rng.random() < 0.5 and lo < 1:
        return rng.uniform(lo, 1.0)
    return rng.uniform(max(lo, 1.0), hi)
