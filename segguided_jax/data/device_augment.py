"""The augmentation of segguided_jax.data.augment in JAX, applied on the accelerator inside the
jitted train step, so that CPU cores do not bound throughput on big hosts.

With data.augment_on_device = True the pipeline ships, per row, the part of its enlarged crop (the
box the rotation and scaling may read, edge I = augment.initial_patch_size(data.patch,
data.augment), placed as on the CPU path) that the row's own draws can read (`reach`), as the
records store it (int16 raw intensities and the case's mean and std, or float32), and the row's
random draws (`draw`: the same numpy draws, in the same order, from the same Generator as the CPU
path's, packed into one float32 vector). sharding.global_batch puts each row's box at the start
of a slot of I³ voxels on its device, and the train step (segguided_jax.training.steps.augmented_train_step)
calls

    image, label = augment_boxes(batch["image"], batch["label"], batch["box"], batch["norm"],
                                 batch["augment"], data_cfg)

which normalises only the voxels it reads. So every random number still comes from the
pipeline's Generator, i.e. from the seed and the position in the stream, and a resumed run draws
the same; and a row without rotation or scaling (most rows, at nnU-Net's probabilities) ships only
its final patch. `augment_boxes` is pure and jittable; data_cfg (config.data) is read while
tracing (Python numbers): close over it. `augment_batch` does the same from whole crops made
elsewhere (tests, benchmarks).

The transforms and their order are those of the numpy version (see its docstring), with these
differences, all forced by static shapes or by what is worth shipping:
- Every transform is computed for every row and selected where its draw says so (vmap turns
  branches into selects): cheap on an accelerator, wasteful on a CPU.
- The spatial transform reads the enlarged crop, not the whole case: points beyond the crop read 0
  (as nnU-Net's enlarged patch); on the CPU path they read the case. initial_patch_size covers a
  rotation about one axis at a time, so only rotations about several axes reach past it.
- The Gaussian noise field is not shipped: the host draws one integer and the accelerator draws the
  field from it with jax.random. Where noise is drawn, the field, and the draws that follow it,
  differ from the CPU path's for the same Generator; their distributions are the same.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from segguided_jax.data import augment as cpu
from segguided_jax.runtime import original_threefry


def _fields(channels: int) -> tuple[tuple[str, int], ...]:
    """The packed draws vector, field by field: (name, length)."""
    return (("matrix", 9),            # output-to-input matrix, row-major (identity: none drawn)
            ("mirror", 3),            # 1 = flip that axis
            ("noise", 3),             # drawn, std, seed of the field
            ("blur", 4 * channels),   # per channel: drawn, three sigmas
            ("brightness", channels),  # factor per channel (1: none drawn)
            ("contrast", 1 + channels),  # drawn, factor per channel
            ("lowres", 2 * channels),  # per channel: drawn, zoom
            ("gamma_invert", 1 + channels),  # drawn, exponent per channel
            ("gamma", 1 + channels),
            ("bias", 1 + len(cpu.BIAS_FIELD_TERMS)))  # drawn, the coefficients


def draws_size(channels: int) -> int:
    """Length of one row's packed draws for images of `channels` channels."""
    return sum(n for _, n in _fields(channels))


def draw(rng: np.random.Generator, cfg, channels: int) -> np.ndarray:
    """One row's random draws (cfg: config.data.augment), in the CPU path's order (spatial,
    intensity, mirror; see transforms.train_patch), packed: (draws_size(channels),) float32."""
    matrix = cpu.draw_spatial(rng, cfg)
    d = cpu.draw_intensity(rng, cfg, channels, noise_shape=None)
    axes = cpu.draw_mirror(rng, cfg)
    ones = [1.0] * channels
    fields = {
        "matrix": np.eye(3) if matrix is None else matrix,
        "mirror": [float(a in axes) for a in range(3)],
        "noise": [0.0, 0.0, 0.0] if d["noise"] is None else [1.0, d["noise"][0], float(d["noise"][1])],
        # Channels not blurred get sigma 1 rather than 0, whose kernel would divide by zero.
        "blur": [[0.0, 1.0, 1.0, 1.0] if s is None else [1.0, *s] for s in d["blur"]],
        "brightness": d["brightness"] or ones,
        "contrast": [float(d["contrast"] is not None), *(d["contrast"] or ones)],
        "lowres": [[0.0, 1.0] if z is None else [1.0, z] for z in d["lowres"]],
        "gamma_invert": [float(d["gamma_invert"] is not None), *(d["gamma_invert"] or ones)],
        "gamma": [float(d["gamma"] is not None), *(d["gamma"] or ones)],
        "bias": [0.0] * (1 + len(cpu.BIAS_FIELD_TERMS)) if d["bias"] is None else [1.0, *d["bias"]],
    }
    return np.concatenate([np.asarray(fields[name], np.float64).ravel() for name, _ in _fields(channels)]
                          ).astype(np.float32)


def unpack(draws, channels: int) -> dict:
    """A packed draws vector (numpy or jax) -> {field name: its slice}, blur and lowres as
    (channels, 4) and (channels, 2)."""
    out, at = {}, 0
    for name, n in _fields(channels):
        out[name] = draws[at: at + n]
        at += n
    out["blur"] = out["blur"].reshape(channels, 4)
    out["lowres"] = out["lowres"].reshape(channels, 2)
    return out


def reach(draws: np.ndarray, patch, initial, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The box of a row's enlarged crop (edge `initial`, the final patch centred in it as in
    `augment_boxes`) that its drawn spatial transform can read: (lower corner (3,), edges (3,))
    int64, inside [0, initial). Every source point of the final patch and both of its linear
    interpolation neighbours lie in it, with a margin for float32 against float64 rounding; without
    a spatial transform it is the final patch itself. What the host ships instead of the whole crop."""
    patch, initial = np.asarray(patch, np.int64), np.asarray(initial, np.int64)
    first = (initial - patch) // 2
    matrix = unpack(np.asarray(draws), channels)["matrix"].reshape(3, 3).astype(np.float64)
    if np.array_equal(matrix, np.eye(3)):
        return first, patch.copy()
    half = (patch - 1) / 2
    corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1).T
    points = corners @ matrix.T + first + half
    lo = np.clip(np.floor(points.min(0) - 1e-3), 0, initial - 1).astype(np.int64)
    hi = np.clip(np.floor(points.max(0) + 1e-3) + 1, lo, initial - 1).astype(np.int64)
    return lo, hi - lo + 1


def augment_boxes(image: jax.Array, label: jax.Array, box: jax.Array, norm: jax.Array, draws: jax.Array,
                  data_cfg) -> tuple[jax.Array, jax.Array]:
    """The train step's augmentation from what the host ships (data.augment_on_device): per row the
    part of its enlarged crop that its draws can read (`reach`), as stored in the records.

    image (B, S, C) int16 or float32: row i's box flattened (C order) at the start of its slot, the
    rest ignored; label (B, S) integer, likewise; box (B, 7) int32: [offset (unused here), lower
    corner (3), edges (3)] in the enlarged crop's coordinates (edge I =
    augment.initial_patch_size(data.patch, data.augment)); norm (B, C, 2) float32 (mean, std): the
    image is (x - mean) / std where any channel is non-zero, 0 elsewhere (records.normalise);
    draws (B, A) float32 (`draw` per row). Returns the augmented final patches: image (B, P, P, P,
    C) float32, label (B, P, P, P) of label's dtype, P = data_cfg.patch, the patch's centre at the
    crop's voxel (I - P) // 2 + (P - 1) / 2 as on the CPU path."""
    patch = tuple(int(p) for p in data_cfg.patch)
    if image.shape[1] < math.prod(patch):
        raise ValueError(f"augment_boxes wants slots of at least the patch's {math.prod(patch)} voxels; got {image.shape[1]}")
    initial = tuple(int(s) for s in cpu.initial_patch_size(patch, data_cfg.augment))
    return _augment_rows(image, label, box[:, 1:], norm, draws, data_cfg, initial, "augment_boxes")


def augment_batch(image: jax.Array, label: jax.Array, draws: jax.Array, data_cfg) -> tuple[jax.Array, jax.Array]:
    """augment_boxes on whole crops already normalised: image (B, I, I, I, C) float32, label (B, I,
    I, I), draws (B, A); the crop's edge is the image's (at least the patch). For crops made
    elsewhere (tests, benchmarks); the train step takes the shipped boxes."""
    patch = tuple(int(p) for p in data_cfg.patch)
    initial = tuple(int(s) for s in image.shape[1:4])
    if any(i < p for i, p in zip(initial, patch)):
        raise ValueError(f"augment_batch wants crops at least as large as the patch {patch}; got {initial}")
    if not (data_cfg.augment.rotation_probability > 0 or data_cfg.augment.scale_probability > 0):
        first = [(i - p) // 2 for i, p in zip(initial, patch)]  # the box `reach` ships: the centre patch
        centre_box = (slice(None),) + tuple(slice(f, f + p) for f, p in zip(first, patch))
        image, label, initial = image[centre_box], label[centre_box], patch
    rows, channels = image.shape[0], image.shape[-1]
    box, norm = _whole(initial, channels)
    return _augment_rows(image.reshape(rows, -1, channels), label.reshape(rows, -1),
                         jnp.broadcast_to(box, (rows, 6)), jnp.broadcast_to(norm, (rows, channels, 2)), draws,
                         data_cfg, initial, "augment_batch")


def _whole(shape, channels: int):
    """The box and statistics of a whole crop of `shape` already normalised: lower corner 0, edges
    its shape; mean 0, std 1 (normalise leaves it as it is)."""
    return jnp.asarray((0, 0, 0) + tuple(shape), jnp.int32), jnp.asarray([[0.0, 1.0]] * channels, jnp.float32)


def _augment_rows(slots, label_slots, box, norm, draws, data_cfg, initial, caller: str):
    """_augment_one over the rows; box (B, 6) [lower corner, edges] in a crop of edge `initial`."""
    if draws.shape[-1] != draws_size(slots.shape[-1]):
        raise ValueError(f"{caller} wants {draws_size(slots.shape[-1])} draws per row for "
                         f"{slots.shape[-1]} channels; got {draws.shape[-1]}")
    patch = tuple(int(p) for p in data_cfg.patch)
    centre = tuple((i - p) // 2 + (p - 1) / 2 for i, p in zip(initial, patch))
    one = lambda x, y, b, n, d: _augment_one(x, y, b, n, d, data_cfg.augment, patch, initial, centre)
    return jax.vmap(one)(slots, label_slots, box, norm, draws)


def _augment_one(slot, label_slot, box, norm, draws, cfg, patch, initial, centre):
    """One row: slot (S, C), label_slot (S,), box (6,) [lower corner, edges], norm (C, 2), draws
    (A,) -> (P, P, P, C) float32, (P, P, P)."""
    d = unpack(draws, slot.shape[-1])
    if cfg.rotation_probability > 0 or cfg.scale_probability > 0:
        image, label = resample_box(slot, label_slot, box, norm, d["matrix"].reshape(3, 3),
                                    jnp.asarray(centre, jnp.float32), patch, initial)
    else:  # no spatial transform can happen: the box is the final patch (`reach`)
        n = math.prod(patch)
        image = normalise(slot[:n], norm).reshape(patch + (slot.shape[-1],))
        label = label_slot[:n].reshape(patch)
    image = augment_intensity(image, d, cfg)
    return mirror(image, label, d["mirror"] > 0.5)


def normalise(raw, norm):
    """raw (..., C) as stored -> float32 (raw - mean) / std where any channel is non-zero, 0
    elsewhere: records.normalise's float32 arithmetic, norm (C, 2) already float32."""
    x = raw.astype(jnp.float32)
    brain = jnp.any(raw != 0, axis=-1, keepdims=True)
    return jnp.where(brain, (x - norm[:, 0]) / norm[:, 1], jnp.float32(0))


def resample(image, label, matrix, centre, patch):
    """resample_box on a whole crop already normalised: image (X, Y, Z, C) float32, label (X, Y, Z)."""
    shape, channels = tuple(int(s) for s in image.shape[:3]), image.shape[-1]
    box, norm = _whole(shape, channels)
    return resample_box(image.reshape(-1, channels), label.reshape(-1), box, norm, matrix, centre, patch, shape)


def resample_box(slot, label_slot, box, norm, matrix, centre, patch, initial):
    """Output voxel p reads the crop (edge `initial`) at matrix @ (p - (patch - 1) / 2) + centre:
    image trilinear, label nearest (ties up), 0 outside [0, n - 1] on any axis (scipy.ndimage's
    mode 'constant', as the numpy version). The crop is known only inside box = (lower corner,
    edges), flattened in slot (S, C) as stored (normalised here, with norm) and label_slot (S,):
    `reach` makes it hold every voxel read. Returns (P, P, P, C) float32 and (P, P, P)."""
    shape = jnp.asarray(initial, jnp.int32)
    lo, edges = box[:3].astype(jnp.int32), box[3:].astype(jnp.int32)
    axes = [jnp.arange(p, dtype=jnp.float32) - (p - 1) / 2 for p in patch]
    grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)
    points = grid @ matrix.T + centre  # (P, P, P, 3)
    valid = jnp.all((points >= 0) & (points <= (shape - 1).astype(jnp.float32)), axis=-1)
    i0 = jnp.clip(jnp.floor(points).astype(jnp.int32), 0, jnp.maximum(shape - 2, 0))
    w = points - i0

    def flat(idx):  # crop coordinates -> the slot's index, clamped into the box
        local = jnp.clip(idx - lo, 0, edges - 1)
        return (local[..., 0] * edges[1] + local[..., 1]) * edges[2] + local[..., 2]

    out = jnp.zeros(patch + (slot.shape[-1],), jnp.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                d = jnp.array([dx, dy, dz], jnp.int32)
                idx = jnp.minimum(i0 + d, shape - 1)
                weight = jnp.prod(jnp.where(d == 1, w, 1 - w), axis=-1)
                out = out + normalise(slot[flat(idx)], norm) * weight[..., None]
    out = jnp.where(valid[..., None], out, 0.0)
    nearest = jnp.clip(jnp.floor(points + 0.5).astype(jnp.int32), 0, shape - 1)
    lab = label_slot[flat(nearest)]
    return out, jnp.where(valid, lab, jnp.zeros((), label_slot.dtype))


def augment_intensity(img, d, cfg):
    """Bias field, noise, blur, brightness, contrast, low resolution, inverted gamma, gamma on img (X, Y, Z, C)
    float32 as drawn in d (`unpack`); returns the new image."""
    drawn = lambda x: x > 0.5
    if cfg.get("bias_field_probability", 0.0) > 0:  # a smooth multiplicative field for all channels
        img = jnp.where(drawn(d["bias"][0]), img * bias_field(img.shape[:3], d["bias"][1:])[..., None], img)
    # noise: one field for all channels
    with original_threefry():
        field = jax.random.normal(jax.random.key(d["noise"][2].astype(jnp.int32)), img.shape[:3], jnp.float32)
    img = jnp.where(drawn(d["noise"][0]), img + (field * d["noise"][1])[..., None], img)
    # blur: per channel, a sigma per axis
    radius = int(4.0 * cfg.blur_sigma_range[1] + 0.5)
    blurred = jax.vmap(lambda x, s: gaussian_blur(x, s, radius), in_axes=(-1, 0), out_axes=-1)(img, d["blur"][:, 1:])
    img = jnp.where(drawn(d["blur"][:, 0]), blurred, img)
    img = img * d["brightness"]
    img = jnp.where(drawn(d["contrast"][0]), contrast(img, d["contrast"][1:]), img)
    # low resolution: per channel, one zoom for all axes
    low = jax.vmap(simulate_low_resolution, in_axes=(-1, 0), out_axes=-1)(img, d["lowres"][:, 1])
    img = jnp.where(drawn(d["lowres"][:, 0]), low, img)
    for key, invert in (("gamma_invert", True), ("gamma", False)):
        out = gamma(img, d[key][1:], invert=invert, retain_stats=cfg.gamma_retain_stats)
        img = jnp.where(drawn(d[key][0]), out, img)
    return img


def bias_field(shape, coefficients):
    """augment.bias_field: exp(sum of c * P_i(x) P_j(y) P_k(z)) on [-1, 1]³, (X, Y, Z) float32."""
    def legendre(n):  # (DEGREE + 1, n): P_0 .. P_3 at np.linspace(-1, 1, n)
        x = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
        return jnp.stack([jnp.ones_like(x), x, (3 * x ** 2 - 1) / 2, (5 * x ** 3 - 3 * x) / 2])
    cube = jnp.zeros((cpu.BIAS_FIELD_DEGREE + 1,) * 3, jnp.float32)
    terms = np.array(cpu.BIAS_FIELD_TERMS)
    cube = cube.at[terms[:, 0], terms[:, 1], terms[:, 2]].set(coefficients)
    lx, ly, lz = (legendre(n) for n in shape)
    return jnp.exp(jnp.einsum("ijk,ix,jy,kz->xyz", cube, lx, ly, lz))


def mirror(img, label, flips):
    """Flips img (X, Y, Z, C) and label (X, Y, Z) along each axis where flips (3,) bool says so."""
    for axis in range(3):
        img = jnp.where(flips[axis], jnp.flip(img, axis), img)
        label = jnp.where(flips[axis], jnp.flip(label, axis), label)
    return img, label


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
