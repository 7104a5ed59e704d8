"""The JAX augmentation against the numpy one, on inputs whose answers are known."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from segguided_jax.data import augment as aug
from segguided_jax.data import device_augment as dev

PATCH = (16, 16, 16)


def _volume(seed=0, shape=(20, 22, 24), channels=2):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal(shape + (channels,)).astype(np.float32)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    return image, label


def _data_cfg(**augment):
    cfg = ml_collections.ConfigDict()
    cfg.patch = PATCH
    cfg.augment = aug.default_augment_config()
    for key in list(cfg.augment.keys()):
        if key.endswith("_probability"):
            cfg.augment[key] = 0.0
    cfg.augment.update(augment)
    return cfg


def _numpy_resample(image, label, matrix, centre, patch):
    read = lambda lo, hi: [image[aug._box(lo, hi) + (c,)] for c in range(image.shape[-1])]
    out, lab = aug.resample(read, label, label.shape, matrix, centre, patch)
    return np.moveaxis(out, 0, -1), lab


@pytest.mark.parametrize("angles, scale", [([0.3, -0.2, 0.4], 1.2), ([0.0, 0.0, 0.0], 0.8), ([-0.5, 0.1, 0.0], 1.4)])
def test_resample_matches_numpy(angles, scale):
    image, label = _volume()
    matrix = aug.affine_matrix(angles, scale)
    centre = np.array([9.5, 10.5, 11.5])
    ref_image, ref_label = _numpy_resample(image, label, matrix, centre, PATCH)
    out_image, out_label = dev.resample(jnp.asarray(image), jnp.asarray(label), jnp.asarray(matrix, jnp.float32),
                                        jnp.asarray(centre, jnp.float32), PATCH)
    np.testing.assert_allclose(np.asarray(out_image), ref_image, atol=1e-4)
    assert (np.asarray(out_label) == ref_label).mean() > 0.995  # float32 vs float64 at rounding ties
    assert (ref_label == 0).mean() > 0.1 or scale < 1  # the patch does read past the source


def test_rotation_by_90_degrees_is_rot90():
    image, label = _volume(shape=(16, 16, 16))
    matrix = jnp.asarray(aug.affine_matrix([math.pi / 2, 0.0, 0.0], 1.0), jnp.float32)
    out_image, out_label = dev.resample(jnp.asarray(image), jnp.asarray(label), matrix, jnp.full(3, 7.5), PATCH)
    np.testing.assert_array_equal(np.asarray(out_label), np.rot90(label, k=-1, axes=(1, 2)))
    np.testing.assert_allclose(np.asarray(out_image), np.rot90(image, k=-1, axes=(1, 2)), atol=1e-5)


def test_low_resolution_blur_gamma_contrast_match_numpy():
    image, _ = _volume(seed=1)
    x = image[..., 0]
    low = jax.jit(dev.simulate_low_resolution)
    for zoom in (0.63, 1.0):
        np.testing.assert_allclose(np.asarray(low(jnp.asarray(x), zoom)), aug.simulate_low_resolution(x, zoom), atol=1e-5)
    sigmas = np.array([0.5, 0.8, 1.0])
    blur = jax.jit(dev.gaussian_blur, static_argnums=2)
    np.testing.assert_allclose(np.asarray(blur(jnp.asarray(x), jnp.asarray(sigmas, jnp.float32), 4)),
                               ndimage.gaussian_filter(x, sigmas), atol=1e-5)
    for invert, retain in ((False, False), (True, True)):
        ref = aug.gamma(x.copy(), 1.3, invert=invert, retain_stats=retain)
        out = dev.gamma(jnp.asarray(image[..., :1]), jnp.array([1.3]), invert=invert, retain_stats=retain)
        np.testing.assert_allclose(np.asarray(out)[..., 0], ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dev.contrast(jnp.asarray(image[..., :1]), jnp.array([1.2])))[..., 0],
                               aug.contrast(x.copy(), 1.2), atol=1e-5)


@functools.cache
def _jitted(**augment):
    cfg = _data_cfg(**augment)
    return jax.jit(lambda key, x, y: dev.augment_batch(key, x, y, cfg))


def _batch(seed=0, size=24):
    image, label = _volume(seed, shape=(size,) * 3, channels=2)
    return jnp.stack([image, image[::-1]]), jnp.stack([label, label[::-1]])


def test_nothing_drawn_is_the_centre_crop_and_mirror_flips_it():
    image, label = _batch()
    crop = (slice(None),) + (slice(4, 20),) * 3  # (24 - 16) // 2 = 4
    out_image, out_label = _jitted()(jax.random.key(0), image, label)
    assert out_image.shape == (2,) + PATCH + (2,) and out_image.dtype == jnp.float32
    assert out_label.shape == (2,) + PATCH and out_label.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image[crop]))
    np.testing.assert_array_equal(np.asarray(out_label), np.asarray(label[crop]))
    # forced rotation 0 and scale 1 through the resampling: the same crop
    out_image, out_label = _jitted(rotation_probability=1.0, rotation_max_degrees=0.0, scale_probability=1.0,
                                   scale_range=(1.0, 1.0))(jax.random.key(0), image, label)
    np.testing.assert_allclose(np.asarray(out_image), np.asarray(image[crop]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_label), np.asarray(label[crop]))
    out_image, out_label = _jitted(mirror_probability=1.0)(jax.random.key(0), image, label)
    np.testing.assert_array_equal(np.asarray(out_label), np.asarray(label[crop])[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image[crop])[:, ::-1, ::-1, ::-1])


def test_random_spatial_keeps_label_values_and_draws_per_row():
    image, label = _batch()
    label = jnp.where(label == 2, 0, label)  # values {0, 1, 3}: a 2 would be an interpolation artefact
    fn = _jitted(rotation_probability=1.0, scale_probability=1.0)
    out_image, out_label = fn(jax.random.key(1), image, label)
    assert set(np.unique(np.asarray(out_label)).tolist()) <= {0, 1, 3}
    assert not np.array_equal(np.asarray(out_label[0]), np.asarray(out_label[1])[::-1, ::-1, ::-1])
    again = fn(jax.random.key(1), image, label)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(out_image))  # same key, same batch
    assert not np.array_equal(np.asarray(fn(jax.random.key(2), image, label)[0]), np.asarray(out_image))


def test_noise_and_brightness_statistics():
    image, label = _batch()
    zero = jnp.zeros_like(image)
    fn = _jitted(noise_probability=1.0)
    stds = []
    for seed in range(40):
        out, _ = fn(jax.random.key(seed), zero, label)
        out = np.asarray(out)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])  # one field for all channels
        stds += [out[0, ..., 0].std(), out[1, ..., 0].std()]
    stds = np.array(stds)
    assert stds.max() < 0.104 and stds.min() < 0.01 and abs(stds.mean() - 0.05) < 0.015  # std ~ U(0, 0.1)
    fn = _jitted(brightness_probability=1.0)
    out, _ = fn(jax.random.key(0), image, label)
    crop = np.asarray(image)[:, 4:20, 4:20, 4:20]
    ratios = np.asarray(out) / crop  # one factor per row and channel
    factors = ratios[:, 0, 0, 0]
    np.testing.assert_allclose(ratios, np.broadcast_to(factors[:, None, None, None], ratios.shape), rtol=1e-5)
    assert (factors >= 0.75).all() and (factors <= 1.25).all() and len(np.unique(factors.round(6))) == 4


def test_everything_on_is_finite_and_jittable_under_partial():
    cfg = _data_cfg()
    for key in list(cfg.augment.keys()):
        if key.endswith("_probability"):
            cfg.augment[key] = 1.0
    image, label = _batch()
    out_image, out_label = jax.jit(functools.partial(dev.augment_batch, data_cfg=cfg))(jax.random.key(3), image, label)
    assert np.isfinite(np.asarray(out_image)).all()
    assert set(np.unique(np.asarray(out_label)).tolist()) <= {0, 1, 2, 3}


def test_crop_smaller_than_the_patch_fails_loudly():
    image, label = _batch(size=12)
    with pytest.raises(ValueError, match="at least as large as the patch"):
        dev.augment_batch(jax.random.key(0), image, label, _data_cfg())


def test_pipeline_crops_for_the_device_hold_the_cpu_paths_patches(tiny_config):
    """With augment_on_device the pipeline ships the enlarged boxes (same placement draws as the
    CPU path); with no transform drawn, augment_batch's centre crop is the CPU path's patch."""
    from segguided_jax.data.pipeline import train_dataset

    cfg = tiny_config.data
    for key in list(cfg.augment.keys()):
        if key.endswith("_probability"):
            cfg.augment[key] = 0.0
    cfg.augment.rotation_probability = 1e-12  # enlarges the box (16 -> 22) but is never drawn
    cfg.foreground_fraction = 0.5
    initial = aug.initial_patch_size(cfg.patch, cfg.augment)
    assert initial == (22, 22, 22)
    cpu = iter(train_dataset(cfg.dir, cfg, seed=3, batch_size=2))
    cfg.augment_on_device = True
    crops = iter(train_dataset(cfg.dir, cfg, seed=3, batch_size=2))
    fn = jax.jit(functools.partial(dev.augment_batch, data_cfg=cfg))
    for step in range(3):
        want, got = next(cpu), next(crops)
        assert got["image"].shape == (2,) + initial + (4,) and got["label"].shape == (2,) + initial
        assert list(got["case_id"]) == list(want["case_id"])
        image, label = fn(jax.random.key(step), got["image"], got["label"])
        np.testing.assert_array_equal(np.asarray(label), want["label"])
        np.testing.assert_allclose(np.asarray(image), want["image"], atol=1e-6)
