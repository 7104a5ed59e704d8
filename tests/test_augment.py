import math

import numpy as np
import pytest
from scipy import ndimage

from segguided_jax.data import augment as aug

SHAPE = (16, 18, 20)  # distinct sizes, so a swapped axis shows up


def _case(seed=0, shape=SHAPE, channels=4):
    """A brain-like patch: z-scored intensities inside an ellipsoid, 0 outside; labels 0..3."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    image = rng.standard_normal((*shape, channels)).astype(np.float32) * brain[..., None]
    label = np.zeros(shape, np.uint8)
    label[brain] = 1
    label[(grid[0] > 0.1) & brain] = 2
    label[(grid[1] > 0.3) & (grid[2] > -0.2) & brain] = 3
    return image, label


def _cfg(**overrides):
    """The nnU-Net defaults with every probability at 0, then the overrides."""
    cfg = aug.default_augment_config()
    for key in list(cfg.keys()):
        if key.endswith("_probability"):
            cfg[key] = 0.0
    cfg.update(overrides)
    return cfg


def _resample(image, label, matrix, centre=None, patch=None):
    """augment.resample on a channels-last array; returns channels-last."""
    shape = label.shape
    centre = (np.asarray(shape) - 1) / 2 if centre is None else centre
    read = lambda lo, hi: [image[aug._box(lo, hi) + (c,)] for c in range(image.shape[-1])]
    out, lab = aug.resample(read, label, shape, matrix, centre, patch or shape)
    return np.moveaxis(out, 0, -1), lab


def test_default_config_has_nnunet_values():
    cfg = aug.default_augment_config()
    assert (cfg.rotation_probability, cfg.rotation_max_degrees) == (0.2, 30.0)
    assert (cfg.scale_probability, tuple(cfg.scale_range)) == (0.2, (0.7, 1.4))
    assert cfg.mirror_probability == 0.5
    assert (cfg.gamma_probability, cfg.gamma_invert_probability, tuple(cfg.gamma_range)) == (0.3, 0.1, (0.7, 1.5))
    assert (cfg.brightness_probability, tuple(cfg.brightness_range)) == (0.15, (0.75, 1.25))
    assert (cfg.contrast_probability, tuple(cfg.contrast_range)) == (0.15, (0.75, 1.25))
    assert (cfg.noise_probability, cfg.noise_std) == (0.1, 0.1)  # nnU-Net's code: a std in [0, 0.1]
    assert (cfg.blur_probability, tuple(cfg.blur_sigma_range)) == (0.2, (0.5, 1.0))
    assert (cfg.lowres_probability, tuple(cfg.lowres_zoom_range)) == (0.25, (0.5, 1.0))
    assert cfg.bias_field_probability == 0.0  # not nnU-Net's; MONAI's range when on
    assert tuple(cfg.bias_field_coeff_range) == (0.0, 0.1)


def test_bias_field_known_values_and_off_draws_nothing():
    """A constant term alone is exp(c) everywhere, a linear one exp(c x) over x in [-1, 1]; at
    probability 0 the draws are those of a config without the key (the bits of every run before
    it), at 1 it draws 20 coefficients in the range and multiplies every channel by one field."""
    coeffs = np.zeros(len(aug.BIAS_FIELD_TERMS))
    coeffs[aug.BIAS_FIELD_TERMS.index((0, 0, 0))] = 0.3
    np.testing.assert_allclose(aug.bias_field((3, 4, 5), coeffs), np.exp(0.3), rtol=1e-6)
    coeffs[:] = 0
    coeffs[aug.BIAS_FIELD_TERMS.index((1, 0, 0))] = 0.5
    field = aug.bias_field((5, 2, 3), coeffs)
    np.testing.assert_allclose(field, np.exp(0.5 * np.linspace(-1, 1, 5))[:, None, None] * np.ones((5, 2, 3)), rtol=1e-6)
    coeffs[:] = 0
    coeffs[aug.BIAS_FIELD_TERMS.index((0, 2, 1))] = 0.2  # P2(y) P1(z)
    y, z = np.linspace(-1, 1, 4), np.linspace(-1, 1, 6)
    want = np.exp(0.2 * ((3 * y ** 2 - 1) / 2)[:, None] * z[None, :])
    np.testing.assert_allclose(aug.bias_field((2, 4, 6), coeffs), np.broadcast_to(want, (2, 4, 6)), rtol=1e-6)

    old, off, on = aug.default_augment_config(), aug.default_augment_config(), aug.default_augment_config()
    del old["bias_field_probability"]
    on.bias_field_probability = 1.0
    rngs = [np.random.default_rng(4) for _ in range(3)]
    draws = [aug.draw_intensity(r, c, 4, noise_shape=(2, 2, 2)) for r, c in zip(rngs, (old, off, on))]
    assert rngs[0].random() == rngs[1].random() != rngs[2].random()
    assert draws[1]["bias"] is None and len(draws[2]["bias"]) == 20
    assert (draws[2]["bias"] >= 0).all() and (draws[2]["bias"] < 0.1).all()
    img = np.ones((2, 6, 7, 8), np.float32)
    only_bias = {**{k: None for k in draws[2]}, "blur": [None] * 2, "lowres": [None] * 2, "bias": draws[2]["bias"]}
    aug.apply_intensity(img, only_bias, on)
    np.testing.assert_allclose(img[0], aug.bias_field((6, 7, 8), draws[2]["bias"]), rtol=1e-6)
    np.testing.assert_array_equal(img[0], img[1])  # one field for every channel


def test_all_probabilities_zero_is_identity():
    image, label = _case()
    out_image, out_label = aug.augment(image, label, np.random.default_rng(0), _cfg())
    assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_everything_on_keeps_shapes_dtypes_and_inputs():
    image, label = _case()
    image_before, label_before = image.copy(), label.copy()
    cfg = aug.default_augment_config()
    for key in list(cfg.keys()):
        if key.endswith("_probability"):
            cfg[key] = 1.0
    out_image, out_label = aug.augment(image, label, np.random.default_rng(1), cfg)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert out_label.shape == label.shape and out_label.dtype == np.uint8
    assert out_image.flags.c_contiguous and out_label.flags.c_contiguous
    assert np.isfinite(out_image).all()
    assert not np.array_equal(out_image, image)
    np.testing.assert_array_equal(image, image_before)  # the caller's arrays are untouched
    np.testing.assert_array_equal(label, label_before)


def test_mirror_probability_one_flips_all_axes():
    image, label = _case()
    out_image, out_label = aug.augment(image, label, np.random.default_rng(0), _cfg(mirror_probability=1.0))
    np.testing.assert_array_equal(out_image, np.flip(image, (0, 1, 2)))
    np.testing.assert_array_equal(out_label, np.flip(label, (0, 1, 2)))


def test_mirror_axes_are_independent_and_joint():
    image, label = _case()
    assert all(not np.array_equal(np.flip(label, a), label) for a in range(3))  # asymmetric on every axis
    seen = set()
    for seed in range(40):
        out_image, out_label = aug.augment(image, label, np.random.default_rng(seed), _cfg(mirror_probability=0.5))
        matches = [axes for axes in _all_axis_subsets() if np.array_equal(out_label, np.flip(label, axes))]
        assert len(matches) == 1
        np.testing.assert_array_equal(out_image, np.flip(image, matches[0]))  # image flipped with label
        seen.add(matches[0])
    assert len(seen) == 8  # every combination of axes turns up


def _all_axis_subsets():
    return [tuple(a for a in range(3) if m >> a & 1) for m in range(8)]


def test_rotation_by_90_degrees_equals_rot90():
    image, label = _case(shape=(16, 16, 16))
    # angles[0] rotates the (Y, Z) plane: output[x, y, z] = input[x, 15 - z, y] = np.rot90(k=-1).
    out_image, out_label = _resample(image, label, aug.affine_matrix([math.pi / 2, 0.0, 0.0], 1.0))
    np.testing.assert_array_equal(out_label, np.rot90(label, k=-1, axes=(1, 2)))
    np.testing.assert_allclose(out_image, np.rot90(image, k=-1, axes=(1, 2)), atol=1e-5)
    # and about the last axis, the (X, Y) plane
    _, out_label = _resample(image, label, aug.affine_matrix([0.0, 0.0, math.pi / 2], 1.0))
    np.testing.assert_array_equal(out_label, np.rot90(label, k=-1, axes=(0, 1)))


def test_rotations_compose_like_nnunet():
    # Rz @ Rx as the output-to-input map: the Rz (X, Y) turn is applied to the volume first.
    _, label = _case(shape=(16, 16, 16))
    image = np.zeros((16, 16, 16, 1), np.float32)
    _, out_label = _resample(image, label, aug.affine_matrix([math.pi / 2, 0.0, math.pi / 2], 1.0))
    expected = np.rot90(np.rot90(label, k=-1, axes=(0, 1)), k=-1, axes=(1, 2))
    np.testing.assert_array_equal(out_label, expected)
    assert not np.array_equal(expected, np.rot90(np.rot90(label, k=-1, axes=(1, 2)), k=-1, axes=(0, 1)))


def test_affine_matrix_is_rotation_times_scale():
    angles = [0.3, -0.2, 0.5]
    m = aug.affine_matrix(angles, 1.3)
    np.testing.assert_allclose(m @ m.T, 1.3 ** 2 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m), 1.3 ** 3, rtol=1e-12)


def test_scale_zooms_out_about_the_centre():
    # Scale 2 reads the input at twice the distance from the centre: a 5³ cube in the middle of 17³
    # becomes a 3³ cube, still centred.
    label = np.zeros((17, 17, 17), np.uint8)
    label[6:11, 6:11, 6:11] = 1  # |i - 8| <= 2
    image = label[..., None].astype(np.float32)
    _, out_label = _resample(image, label, aug.affine_matrix([0, 0, 0], 2.0))
    expected = np.zeros_like(label)
    expected[7:10, 7:10, 7:10] = 1  # |2 (i - 8)| <= 2  <=>  |i - 8| <= 1
    np.testing.assert_array_equal(out_label, expected)


@pytest.mark.parametrize("scale", [0.7, 1.0, 1.37])
def test_axis_by_axis_scaling_equals_scipy_affine_transform(scale):
    # The separable path (diagonal matrices) gives ndimage.affine_transform's values, including
    # its mode 'constant' edges, on a patch that reads past the source's border.
    image, label = _case(seed=3, shape=(15, 17, 19), channels=2)
    centre = np.array([5.0, 9.5, 12.25])
    patch = (12, 14, 16)
    matrix = np.diag([scale] * 3)
    out_image, out_label = _resample(image, label, matrix, centre, patch)
    offset = centre - matrix @ ((np.asarray(patch) - 1) / 2)
    for c in range(2):
        ref = ndimage.affine_transform(image[..., c], matrix, offset=offset, output_shape=patch, order=1,
                                       mode="constant")
        np.testing.assert_allclose(out_image[..., c], ref, atol=1e-5)
    ref = ndimage.affine_transform(label, matrix, offset=offset, output_shape=patch, order=0, mode="constant")
    assert (out_label == ref).mean() > 0.995  # nearest: float ties may round differently
    assert (out_label == 0).any() and (out_image[..., 0] == 0).any()  # some of it lies outside


def test_resample_reads_the_source_beyond_the_final_patch():
    # A 48³ source of ones: a 16³ patch at its centre, rotated 40° and zoomed out 1.4x, reads
    # only real voxels (the old final-size crop rotated in place filled ~half of it with zeros).
    source = np.ones((48, 48, 48, 1), np.float32)
    label = np.ones((48, 48, 48), np.uint8)
    matrix = aug.affine_matrix([0.7, -0.7, 0.7], 1.4)
    out_image, out_label = _resample(source, label, matrix, centre=np.full(3, 23.5), patch=(16, 16, 16))
    np.testing.assert_allclose(out_image, 1.0, atol=1e-6)
    assert (out_label == 1).all()
    in_place, _ = _resample(source[:16, :16, :16], label[:16, :16, :16], matrix)
    assert (in_place == 0).mean() > 0.3


def test_initial_patch_size_is_nnunets_get_patch_size():
    patch = (128, 128, 128)
    assert aug.initial_patch_size(patch, _cfg()) == patch  # no rotation, no scaling
    rot = _cfg(rotation_probability=0.2, rotation_max_degrees=30.0)
    # nnU-Net: the extent vector rotated by 30° about one axis: 128 (cos 30° + sin 30°) = 174.85
    assert aug.initial_patch_size(patch, rot) == (175, 175, 175)
    both = _cfg(rotation_probability=0.2, scale_probability=0.2, scale_range=(0.7, 1.4))
    assert aug.initial_patch_size(patch, both) == (245, 245, 245)  # 174.85 * 1.4 = 244.8
    assert aug.initial_patch_size((128, 96, 64), _cfg(scale_probability=1.0, scale_range=(0.5, 0.9))) == (128, 96, 64)


def test_forced_rotation_zero_and_scale_one_is_identity():
    image, label = _case()
    cfg = _cfg(rotation_probability=1.0, rotation_max_degrees=0.0, scale_probability=1.0, scale_range=(1.0, 1.0))
    out_image, out_label = aug.augment(image, label, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out_label, label)
    np.testing.assert_allclose(out_image, image, atol=1e-6)


def test_random_spatial_transform_keeps_label_values_and_moves_image_with_label():
    image, label = _case()
    label[label == 2] = 0  # input values {0, 1, 3}: a 2 appearing would be an interpolation artefact
    image[..., 0] = label  # a channel that is the label, to see that image and label move together
    cfg = _cfg(rotation_probability=1.0, scale_probability=1.0)
    for seed in range(3):
        out_image, out_label = aug.augment(image, label, np.random.default_rng(seed), cfg)
        assert set(np.unique(out_label)) <= {0, 1, 3}
        assert not np.array_equal(out_label, label)
        # linear and nearest sampling of the same map agree except at some boundary voxels
        assert (np.rint(out_image[..., 0]) == out_label).mean() > 0.9


def test_same_rng_same_output_other_seed_differs():
    image, label = _case()
    cfg = aug.default_augment_config()
    for key in list(cfg.keys()):
        if key.endswith("_probability"):
            cfg[key] = 1.0 if key != "mirror_probability" else 0.5
    a = aug.augment(image, label, np.random.default_rng([7, 3]), cfg)
    b = aug.augment(image, label, np.random.default_rng([7, 3]), cfg)
    c = aug.augment(image, label, np.random.default_rng([7, 4]), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_global_numpy_state_is_not_used():
    image, label = _case()
    cfg = _cfg(rotation_probability=1.0, noise_probability=1.0, blur_probability=1.0, mirror_probability=0.5)
    np.random.seed(0)
    a = aug.augment(image, label, np.random.default_rng(5), cfg)
    state = np.random.get_state()
    np.random.seed(1)
    b = aug.augment(image, label, np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.random.seed(0)
    aug.augment(image, label, np.random.default_rng(5), cfg)
    assert np.array_equal(np.random.get_state()[1], state[1])  # and it draws nothing from it


def test_gamma_one_is_identity():
    image, label = _case()
    cfg = _cfg(gamma_probability=1.0, gamma_invert_probability=1.0, gamma_range=(1.0, 1.0))
    out_image, out_label = aug.augment(image, label, np.random.default_rng(0), cfg)
    np.testing.assert_allclose(out_image, image, atol=1e-5)
    np.testing.assert_array_equal(out_label, label)


def test_gamma_known_values():
    x = np.linspace(0.0, 1.0, 11, dtype=np.float32).reshape(1, 1, 11)
    np.testing.assert_allclose(aug.gamma(x.copy(), 2.0, retain_stats=False), x ** 2, atol=1e-6)
    # on the negated channel: -((1 - x) ** 2) shifted back, i.e. 1 - (1 - x) ** 2
    np.testing.assert_allclose(aug.gamma(x.copy(), 2.0, invert=True, retain_stats=False), 1 - (1 - x) ** 2, atol=1e-6)
    # min and max stay put, on any range
    y = 3 * x - 1
    out = aug.gamma(y.copy(), 0.7, retain_stats=False)
    assert math.isclose(out.min(), -1, abs_tol=1e-6) and math.isclose(out.max(), 2, abs_tol=1e-6)
    out = aug.gamma(y.copy(), 1.5, retain_stats=True)
    assert not np.allclose(out, y, atol=1e-3)
    assert math.isclose(out.mean(), y.mean(), abs_tol=1e-5) and math.isclose(out.std(), y.std(), rel_tol=1e-5)


def test_brightness_known_multiplier():
    image, label = _case()
    cfg = _cfg(brightness_probability=1.0, brightness_range=(1.2, 1.2))
    out_image, _ = aug.augment(image, label, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out_image, image * np.float32(1.2))


def test_brightness_draws_one_factor_per_channel_in_range():
    image, label = _case()
    out_image, _ = aug.augment(image, label, np.random.default_rng(3), _cfg(brightness_probability=1.0))
    inside = image[..., 0] != 0
    ratios = out_image[inside] / image[inside]  # (voxels, C)
    np.testing.assert_allclose(ratios, ratios[:1].repeat(len(ratios), 0), rtol=1e-5)
    assert (ratios[0] >= 0.75).all() and (ratios[0] <= 1.25).all()
    assert len(np.unique(ratios[0].round(6))) == 4


def test_bg_contrast_halves():
    rng = np.random.default_rng(0)
    draws = np.array([aug.bg_contrast((0.5, 3.0), rng) for _ in range(4000)])
    assert draws.min() >= 0.5 and draws.max() <= 3.0
    assert abs((draws < 1).mean() - 0.5) < 0.03  # half below 1 although only 1/5 of the range is


def test_contrast_known_values():
    x = np.array([0.0, 1.0, 2.0, 3.0], np.float32).reshape(1, 1, 4)  # mean 1.5
    np.testing.assert_allclose(aug.contrast(x.copy(), 0.5), [[[0.75, 1.25, 1.75, 2.25]]])
    np.testing.assert_allclose(aug.contrast(x.copy(), 2.0), [[[0.0, 0.5, 2.5, 3.0]]])  # -1.5 and 4.5 clipped
    image, label = _case()
    out_image, _ = aug.augment(image, label, np.random.default_rng(0),
                               _cfg(contrast_probability=1.0, contrast_range=(1.0, 1.0)))
    np.testing.assert_allclose(out_image, image, atol=1e-6)


def test_noise_std_is_uniform_up_to_noise_std_and_shared_across_channels():
    # nnU-Net's code draws the noise's standard deviation uniformly in [0, 0.1].
    image = np.zeros((16, 16, 16, 2), np.float32)
    label = np.zeros((16, 16, 16), np.uint8)
    stds = []
    for seed in range(300):
        out, _ = aug.augment(image, label, np.random.default_rng(seed), _cfg(noise_probability=1.0, noise_std=0.1))
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        stds.append(out[..., 0].std())
    stds = np.array(stds)  # each within ~1 % of its drawn std (4096 voxels)
    assert stds.max() < 0.1 * 1.04 and stds.min() < 0.005 and stds.max() > 0.095
    # U(0, 0.1): mean 0.05 (std of the mean of 300 draws: 0.0017); a variance in [0, 0.1] would
    # give stds with mean 0.21
    assert abs(stds.mean() - 0.05) < 0.007
    assert abs((stds < 0.05).mean() - 0.5) < 0.1


def test_blur_matches_gaussian_with_known_width():
    delta = np.zeros((21, 21, 21, 1), np.float32)
    delta[10, 10, 10] = 1.0
    cfg = _cfg(blur_probability=1.0, blur_per_channel_probability=1.0, blur_sigma_range=(1.0, 1.0))
    out, _ = aug.augment(delta, np.zeros((21, 21, 21), np.uint8), np.random.default_rng(0), cfg)
    out = out[..., 0]
    assert math.isclose(out.sum(), 1.0, rel_tol=1e-4)
    coords = np.arange(21) - 10
    for axis in range(3):
        marginal = out.sum(tuple(a for a in range(3) if a != axis))
        assert math.isclose((marginal * coords ** 2).sum(), 1.0, rel_tol=0.02)  # variance = sigma²


def test_blur_per_channel_probability_zero_and_one():
    image, label = _case()
    out, _ = aug.augment(image, label, np.random.default_rng(0),
                         _cfg(blur_probability=1.0, blur_per_channel_probability=0.0))
    np.testing.assert_array_equal(out, image)
    out, _ = aug.augment(image, label, np.random.default_rng(0),
                         _cfg(blur_probability=1.0, blur_per_channel_probability=1.0))
    assert all(out[..., c].std() < 0.8 * image[..., c].std() for c in range(4))


def test_lowres_zoom_one_is_identity():
    image, label = _case()
    cfg = _cfg(lowres_probability=1.0, lowres_per_channel_probability=1.0, lowres_zoom_range=(1.0, 1.0))
    out, _ = aug.augment(image, label, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out, image)


def test_lowres_known_values():
    # n = 4, zoom 0.5: torch's 'nearest-exact' keeps fine voxels 1 and 3; linear upsampling with
    # half-voxel centres reads the coarse grid at -0.25 (clamped to 0), 0.25, 0.75 and 1.25.
    x = np.array([10.0, 20.0, 30.0, 40.0], np.float32).reshape(1, 1, 4)
    out = aug.simulate_low_resolution(x, 0.5)
    np.testing.assert_allclose(out[0, 0], [20.0, 25.0, 35.0, 40.0], atol=1e-5)


def test_lowres_keeps_shape_and_smooth_content():
    shape = (17, 19, 23)
    ramp = np.broadcast_to(np.linspace(-1, 1, shape[2], dtype=np.float32), shape)
    for zoom in (0.5, 0.63, 0.9):
        out = aug.simulate_low_resolution(ramp, zoom)
        assert out.shape == shape and out.dtype == np.float32
        # staircase of the nearest downsampling: each voxel lands within one coarse step
        assert np.abs(out - ramp).max() < 2.0 / (shape[2] - 1) / zoom + 0.05
        # upsampled by interpolation, not by repeating the coarse voxels
        assert len(np.unique(out[0, 0])) > round(shape[2] * zoom)
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = aug.simulate_low_resolution(noise, 0.5)
    assert not np.allclose(out, noise, atol=0.1)
    np.testing.assert_allclose(aug.simulate_low_resolution(np.full(shape, 2.5, np.float32), 0.5), 2.5, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 24, 24), (17, 20, 23)])
def test_odd_shapes_and_single_channel(shape):
    image, label = _case(shape=shape, channels=1)
    cfg = aug.default_augment_config()
    for key in list(cfg.keys()):
        if key.endswith("_probability"):
            cfg[key] = 1.0
    out_image, out_label = aug.augment(image, label, np.random.default_rng(0), cfg)
    assert out_image.shape == image.shape and out_label.shape == label.shape


def test_bad_shapes_fail_loudly():
    image, label = _case()
    with pytest.raises(ValueError, match="X, Y, Z, C"):
        aug.augment(image[..., 0], label, np.random.default_rng(0), _cfg())
    with pytest.raises(ValueError, match="X, Y, Z, C"):
        aug.augment(image, label[:-1], np.random.default_rng(0), _cfg())
