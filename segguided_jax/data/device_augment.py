"""The augmentation of segguided_jax.data.augment in JAX, to run on the accelerator inside the jitted
train step, so that CPU cores do not bound throughput on big hosts.

With data.augment_on_device = True the pipeline ships each row's enlarged crop (the box the
rotation and scaling may read, edge I = augment.initial_patch_size(data.patch, data.augment),
placed as on the CPU path) instead of the final patch, and the train step calls

    image, label = augment_batch(key, batch["image"], batch["label"], data_cfg)

with a key derived from (seed, step), e.g. jax.random.fold_in(jax.random.key(seed), step).
`augment_batch` is pure and jittable; data_cfg (config.data) is read while tracing (Python
numbers), so close over it (functools.partial) rather than passing it as a traced argument.

The transforms, their order, probabilities and ranges are those of the numpy version (see its
docstring), with these differences, all forced by static shapes:
- Every transform is computed for every row and selected where its draw says so (vmap turns
  branches into selects): cheap on an accelerator, wasteful on a CPU.
- The spatial transform reads the enlarged crop, not the whole case: points beyond the crop read 0
  (as nnU-Net's enlarged patch); on the CPU path they read the case.
- Random numbers come from jax.random, so the same seed gives other draws than the numpy version;
  the distributions are the same.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def augment_batch(key: jax.Array, image: jax.Array, label: jax.Array, data_cfg) -> tuple[jax.Array, jax.Array]:
    """image (B, I, I, I, C) float32 enlarged crops, label (B, I, I, I) integer -> the augmented
    final patches: image (B, P, P, P, C) float32, label (B, P, P, P) of label's dtype, P =
    data_cfg.patch. The final patch's centre is the crop's voxel (I - P) // 2 + (P - 1) / 2."""
    patch = tuple(int(p) for p in data_cfg.patch)
    initial = tuple(int(s) for s in image.shape[1:4])
    if any(i < p for i, p in zip(initial, patch)):
        raise ValueError(f"augment_batch wants crops at least as large as the patch {patch}; got {initial}")
    centre = tuple((i - p) // 2 + (p - 1) / 2 for i, p in zip(initial, patch))
    keys = jax.random.split(key, image.shape[0])
    return jax.vmap(lambda k, x, y: augment_one(k, x, y, data_cfg.augment, patch, centre))(keys, image, label)


def augment_one(key, image, label, cfg, patch, centre):
    """One row: image (I, I, I, C), label (I, I, I) -> (P, P, P, C) float32, (P, P, P)."""
    k_spatial, k_intensity, k_mirror = jax.random.split(key, 3)
    if cfg.rotation_probability > 0 or cfg.scale_probability > 0:
        matrix = draw_spatial(k_spatial, cfg)
        image, label = resample(image, label, matrix, jnp.asarray(centre, jnp.float32), patch)
    else:  # no spatial transform can happen: the centre crop
        lo = [int(round(c - (p - 1) / 2)) for c, p in zip(centre, patch)]
        box = tuple(slice(a, a + p) for a, p in zip(lo, patch))
        image, label = image[box], label[box]
    image = augment_intensity(k_intensity, image.astype(jnp.float32), cfg)
    return mirror(k_mirror, image, label, cfg)


def draw_spatial(key, cfg) -> jax.Array:
    """(3, 3) float32 output-to-input matrix Rz @ Ry @ Rx @ (scale * I) (augment.affine_matrix),
    the identity when neither rotation nor scaling is drawn."""
    k = jax.random.split(key, 4)
    do_rotate = jax.random.uniform(k[0]) < cfg.rotation_probability
    do_scale = jax.random.uniform(k[1]) < cfg.scale_probability
    max_rad = math.radians(cfg.rotation_max_degrees)
    angles = jnp.where(do_rotate, jax.random.uniform(k[2], (3,), minval=-max_rad, maxval=max_rad), 0.0)
    lo, hi = cfg.scale_range
    scale = jnp.where(do_scale, jax.random.uniform(k[3], (), minval=lo, maxval=hi), 1.0)
    return affine_matrix(angles, scale)


def affine_matrix(angles, scale) -> jax.Array:
    """augment.affine_matrix in jnp: angles (3,) radians, scale () -> (3, 3) float32."""
    cx, cy, cz = jnp.cos(angles[0]), jnp.cos(angles[1]), jnp.cos(angles[2])
    sx, sy, sz = jnp.sin(angles[0]), jnp.sin(angles[1]), jnp.sin(angles[2])
    one, zero = jnp.ones_like(cx), jnp.zeros_like(cx)
    rx = jnp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = jnp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return (rz @ ry @ rx * scale).astype(jnp.float32)


def resample(image, label, matrix, centre, patch):
    """Output voxel p reads the source at matrix @ (p - (patch - 1) / 2) + centre: image (X, Y, Z, C)
    trilinear, label (X, Y, Z) nearest (ties up), 0 outside [0, n - 1] on any axis (scipy.ndimage's
    mode 'constant', as the numpy version). Returns (P, P, P, C) float32 and (P, P, P)."""
    shape = jnp.asarray(image.shape[:3], jnp.int32)
    axes = [jnp.arange(p, dtype=jnp.float32) - (p - 1) / 2 for p in patch]
    grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)
    points = grid @ matrix.T + centre  # (P, P, P, 3)
    valid = jnp.all((points >= 0) & (points <= (shape - 1).astype(jnp.float32)), axis=-1)
    i0 = jnp.clip(jnp.floor(points).astype(jnp.int32), 0, jnp.maximum(shape - 2, 0))
    w = points - i0
    flat = image.reshape(-1, image.shape[-1])
    out = jnp.zeros(patch + (image.shape[-1],), jnp.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                d = jnp.array([dx, dy, dz], jnp.int32)
                idx = jnp.minimum(i0 + d, shape - 1)
                flat_idx = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
                weight = jnp.prod(jnp.where(d == 1, w, 1 - w), axis=-1)
                out = out + flat[flat_idx] * weight[..., None]
    out = jnp.where(valid[..., None], out, 0.0)
    nearest = jnp.clip(jnp.floor(points + 0.5).astype(jnp.int32), 0, shape - 1)
    lab = label[nearest[..., 0], nearest[..., 1], nearest[..., 2]]
    return out, jnp.where(valid, lab, jnp.zeros((), label.dtype))


def augment_intensity(key, img, cfg):
    """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma on img (X, Y, Z, C)
    float32, each drawn as the numpy version draws it; returns the new image."""
    k = jax.random.split(key, 7)
    n_channels = img.shape[-1]
    # noise: one field for all channels, std uniform in [0, noise_std]
    kk = jax.random.split(k[0], 3)
    std = jax.random.uniform(kk[1], (), maxval=cfg.noise_std)
    noise = std * jax.random.normal(kk[2], img.shape[:3], jnp.float32)
    img = jnp.where(jax.random.uniform(kk[0]) < cfg.noise_probability, img + noise[..., None], img)
    # blur: per channel, a sigma per axis
    kk = jax.random.split(k[1], 3)
    apply = (jax.random.uniform(kk[0]) < cfg.blur_probability) & (
        jax.random.uniform(kk[1], (n_channels,)) < cfg.blur_per_channel_probability)
    sigmas = jax.random.uniform(kk[2], (n_channels, 3), minval=cfg.blur_sigma_range[0], maxval=cfg.blur_sigma_range[1])
    radius = int(4.0 * cfg.blur_sigma_range[1] + 0.5)
    blurred = jax.vmap(lambda x, s: gaussian_blur(x, s, radius), in_axes=(-1, 0), out_axes=-1)(img, sigmas)
    img = jnp.where(apply, blurred, img)
    # brightness: a factor per channel
    kk = jax.random.split(k[2], 2)
    factors = bg_contrast(kk[1], cfg.brightness_range, (n_channels,))
    img = jnp.where(jax.random.uniform(kk[0]) < cfg.brightness_probability, img * factors, img)
    # contrast about each channel's mean, clipped to its old range
    kk = jax.random.split(k[3], 2)
    factors = bg_contrast(kk[1], cfg.contrast_range, (n_channels,))
    img = jnp.where(jax.random.uniform(kk[0]) < cfg.contrast_probability, contrast(img, factors), img)
    # low resolution: per channel, one zoom for all axes
    kk = jax.random.split(k[4], 3)
    apply = (jax.random.uniform(kk[0]) < cfg.lowres_probability) & (
        jax.random.uniform(kk[1], (n_channels,)) < cfg.lowres_per_channel_probability)
    zooms = jax.random.uniform(kk[2], (n_channels,), minval=cfg.lowres_zoom_range[0], maxval=cfg.lowres_zoom_range[1])
    low = jax.vmap(simulate_low_resolution, in_axes=(-1, 0), out_axes=-1)(img, zooms)
    img = jnp.where(apply, low, img)
    # gamma on the inverted image, then gamma
    for kg, invert, probability in ((k[5], True, cfg.gamma_invert_probability), (k[6], False, cfg.gamma_probability)):
        kk = jax.random.split(kg, 2)
        exponents = bg_contrast(kk[1], cfg.gamma_range, (n_channels,))
        out = gamma(img, exponents, invert=invert, retain_stats=cfg.gamma_retain_stats)
        img = jnp.where(jax.random.uniform(kk[0]) < probability, out, img)
    return img


def mirror(key, img, label, cfg):
    """Flips img (X, Y, Z, C) and label (X, Y, Z) along each axis with probability
    cfg.mirror_probability."""
    flips = jax.random.uniform(key, (3,)) < cfg.mirror_probability
    for axis in range(3):
        img = jnp.where(flips[axis], jnp.flip(img, axis), img)
        label = jnp.where(flips[axis], jnp.flip(label, axis), label)
    return img, label


def bg_contrast(key, value_range, shape):
    """augment.bg_contrast for `shape` independent draws."""
    lo, hi = value_range
    k1, k2 = jax.random.split(key)
    low_half = (jax.random.uniform(k1, shape) < 0.5) & (lo < 1)
    a = jnp.where(low_half, lo, max(lo, 1.0))
    b = jnp.where(low_half, 1.0, hi)
    return a + (b - a) * jax.random.uniform(k2, shape)


def gaussian_blur(x, sigmas, radius: int):
    """x (X, Y, Z) blurred with a Gaussian of sigmas (3,) per axis, truncated at int(4 sigma + 0.5)
    voxels (at most `radius`), edges reflected: scipy.ndimage.gaussian_filter's defaults."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    for axis in range(3):
        s = sigmas[axis]
        r = jnp.floor(4.0 * s + 0.5)
        w = jnp.where(jnp.abs(offsets) <= r, jnp.exp(-0.5 * offsets ** 2 / s ** 2), 0.0)
        w = w / w.sum()
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(w[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(2 * radius + 1))
    return x


def contrast(img, factors):
    """img (X, Y, Z, C): (x - mean) * factor + mean per channel, clipped to the channel's range."""
    mean = img.mean(axis=(0, 1, 2))
    lo, hi = img.min(axis=(0, 1, 2)), img.max(axis=(0, 1, 2))
    return jnp.clip((img - mean) * factors + mean, lo, hi)


def gamma(img, exponents, *, invert: bool, retain_stats: bool):
    """augment.gamma on every channel of img (X, Y, Z, C), exponents (C,)."""
    x = -img if invert else img
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    lo = x.min(axis=(0, 1, 2))
    span = jnp.maximum(x.max(axis=(0, 1, 2)) - lo, 1e-7)
    y = jnp.clip((x - lo) / span, 0.0, 1.0) ** exponents
    if retain_stats:
        y_mean, y_std = y.mean(axis=(0, 1, 2)), y.std(axis=(0, 1, 2))
        y = (y - y_mean) * (span * std / jnp.maximum(y_std * span, 1e-7)) + mean
    else:
        y = y * span + lo
    return -y if invert else y


def simulate_low_resolution(x, zoom):
    """augment.simulate_low_resolution with static shapes: x (X, Y, Z), zoom () -> (X, Y, Z). Per
    axis (nearest down and linear up are separable), the coarse grid of round(n * zoom) voxels is
    never built: output voxel i interpolates the two fine voxels its coarse neighbours came from."""
    for axis, n in enumerate(x.shape):
        m = jnp.maximum(jnp.round(n * zoom), 1.0)
        i = jnp.arange(n, dtype=jnp.float32)
        src = jnp.maximum((i + 0.5) * (m / n) - 0.5, 0.0)
        j0 = jnp.minimum(jnp.floor(src), m - 1)
        j1 = jnp.minimum(j0 + 1, m - 1)
        w = (src - j0).astype(jnp.float32)
        fine = lambda j: jnp.minimum(jnp.floor((j + 0.5) * (n / m)), n - 1).astype(jnp.int32)
        a = jnp.take(x, fine(j0), axis=axis)
        b = jnp.take(x, fine(j1), axis=axis)
        shape = [1] * 3
        shape[axis] = n
        w = w.reshape(shape)
        x = a + (b - a) * w
    return x
