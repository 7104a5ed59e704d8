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


def test_bias_field_matches_numpy():
    rng = np.random.default_rng(2)
    for shape in ((16, 16, 16), (5, 9, 1)):
        coeffs = rng.uniform(-0.3, 0.3, len(aug.BIAS_FIELD_TERMS))
        np.testing.assert_allclose(np.asarray(jax.jit(dev.bias_field, static_argnums=0)(shape, coeffs)),
                                   aug.bias_field(shape, coeffs), rtol=2e-6)


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


def _draws(cfg, rows, seed=0, channels=2):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([dev.draw(rng, cfg.augment, channels) for _ in range(rows)]))


@functools.cache
def _jitted(**augment):
    cfg = _data_cfg(**augment)
    fn = jax.jit(lambda x, y, d: dev.augment_batch(x, y, d, cfg))
    return lambda seed, x, y: fn(x, y, _draws(cfg, x.shape[0], seed, x.shape[-1]))


def _batch(seed=0, size=24):
    image, label = _volume(seed, shape=(size,) * 3, channels=2)
    return jnp.stack([image, image[::-1]]), jnp.stack([label, label[::-1]])


def test_draws_follow_the_cpu_paths_sequence():
    """draw consumes the Generator as transforms.train_patch does after the placement (spatial,
    intensity, mirror), so the rows' draws are the CPU path's; only a drawn noise field is replaced
    by one integer."""
    cfg = _data_cfg(rotation_probability=0.5, scale_probability=0.5, blur_probability=0.5, gamma_probability=0.5,
                    contrast_probability=0.5, lowres_probability=0.5, brightness_probability=0.5,
                    mirror_probability=0.5)
    for seed in range(20):
        rng_cpu, rng_dev = np.random.default_rng(seed), np.random.default_rng(seed)
        matrix = aug.draw_spatial(rng_cpu, cfg.augment)
        d = aug.draw_intensity(rng_cpu, cfg.augment, 3, noise_shape=(4, 4, 4))
        axes = aug.draw_mirror(rng_cpu, cfg.augment)
        packed = dev.unpack(dev.draw(rng_dev, cfg.augment, 3), 3)
        assert rng_cpu.random() == rng_dev.random()  # both Generators at the same place afterwards
        np.testing.assert_allclose(packed["matrix"].reshape(3, 3), np.eye(3) if matrix is None else matrix, rtol=1e-6)
        assert [a for a in range(3) if packed["mirror"][a]] == list(axes)
        for c in range(3):
            assert bool(packed["blur"][c, 0]) == (d["blur"][c] is not None)
            if d["blur"][c] is not None:
                np.testing.assert_allclose(packed["blur"][c, 1:], d["blur"][c], rtol=1e-6)
            assert bool(packed["lowres"][c, 0]) == (d["lowres"][c] is not None)
        np.testing.assert_allclose(packed["brightness"], d["brightness"] or [1.0] * 3, rtol=1e-6)
        for key in ("contrast", "gamma"):
            assert bool(packed[key][0]) == (d[key] is not None)
            if d[key] is not None:
                np.testing.assert_allclose(packed[key][1:], d[key], rtol=1e-6)


def test_nothing_drawn_is_the_centre_crop_and_mirror_flips_it():
    image, label = _batch()
    crop = (slice(None),) + (slice(4, 20),) * 3  # (24 - 16) // 2 = 4
    out_image, out_label = _jitted()(0, image, label)
    assert out_image.shape == (2,) + PATCH + (2,) and out_image.dtype == jnp.float32
    assert out_label.shape == (2,) + PATCH and out_label.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image[crop]))
    np.testing.assert_array_equal(np.asarray(out_label), np.asarray(label[crop]))
    # forced rotation 0 and scale 1 through the resampling: the same crop
    out_image, out_label = _jitted(rotation_probability=1.0, rotation_max_degrees=0.0, scale_probability=1.0,
                                   scale_range=(1.0, 1.0))(0, image, label)
    np.testing.assert_allclose(np.asarray(out_image), np.asarray(image[crop]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_label), np.asarray(label[crop]))
    out_image, out_label = _jitted(mirror_probability=1.0)(0, image, label)
    np.testing.assert_array_equal(np.asarray(out_label), np.asarray(label[crop])[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image[crop])[:, ::-1, ::-1, ::-1])


def test_random_spatial_keeps_label_values_and_draws_per_row():
    image, label = _batch()
    label = jnp.where(label == 2, 0, label)  # values {0, 1, 3}: a 2 would be an interpolation artefact
    fn = _jitted(rotation_probability=1.0, scale_probability=1.0)
    out_image, out_label = fn(1, image, label)
    assert set(np.unique(np.asarray(out_label)).tolist()) <= {0, 1, 3}
    assert not np.array_equal(np.asarray(out_label[0]), np.asarray(out_label[1])[::-1, ::-1, ::-1])
    again = fn(1, image, label)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(out_image))  # same draws, same batch
    assert not np.array_equal(np.asarray(fn(2, image, label)[0]), np.asarray(out_image))


def test_noise_follows_its_drawn_std_and_brightness_its_factors():
    image, label = _batch()
    zero = jnp.zeros_like(image)
    cfg = _data_cfg(noise_probability=1.0)
    fn = jax.jit(lambda x, y, d: dev.augment_batch(x, y, d, cfg))
    for seed in range(4):
        draws = _draws(cfg, 2, seed)
        out = np.asarray(fn(zero, label, draws)[0])
        np.testing.assert_array_equal(out[..., 0], out[..., 1])  # one field for all channels
        for row in range(2):
            noise = dev.unpack(np.asarray(draws[row]), 2)["noise"]
            assert noise[0] == 1 and 0 <= noise[1] <= 0.1
            assert out[row, ..., 0].std() == pytest.approx(noise[1], rel=0.1)  # 4096 voxels
        assert not np.array_equal(out[0], out[1])  # each row its own field
    cfg = _data_cfg(brightness_probability=1.0)
    draws = _draws(cfg, 2, 0)
    out, _ = jax.jit(lambda x, y, d: dev.augment_batch(x, y, d, cfg))(image, label, draws)
    ratios = np.asarray(out) / np.asarray(image)[:, 4:20, 4:20, 4:20]
    factors = np.stack([dev.unpack(np.asarray(d), 2)["brightness"] for d in draws])
    np.testing.assert_allclose(ratios, np.broadcast_to(factors[:, None, None, None], ratios.shape), rtol=1e-5)
    assert (factors >= 0.75).all() and (factors <= 1.25).all() and len(np.unique(factors.round(6))) == 4


def test_everything_on_is_finite_and_jittable_under_partial():
    cfg = _data_cfg()
    for key in list(cfg.augment.keys()):
        if key.endswith("_probability"):
            cfg.augment[key] = 1.0
    image, label = _batch()
    out_image, out_label = jax.jit(functools.partial(dev.augment_batch, data_cfg=cfg))(
        image, label, _draws(cfg, 2, 3))
    assert np.isfinite(np.asarray(out_image)).all()
    assert set(np.unique(np.asarray(out_label)).tolist()) <= {0, 1, 2, 3}


def test_crop_smaller_than_the_patch_or_wrong_draws_fail_loudly():
    image, label = _batch(size=12)
    with pytest.raises(ValueError, match="at least as large as the patch"):
        dev.augment_batch(image, label, _draws(_data_cfg(), 2), _data_cfg())
    image, label = _batch()
    with pytest.raises(ValueError, match="draws per row"):
        dev.augment_batch(image, label, _draws(_data_cfg(), 2, channels=4), _data_cfg())


def _all_but_noise(cfg):
    """Every transform on (noise off: its field is the one draw the accelerator makes itself), with
    rotations of at most 3 degrees and zooms in (scale <= 0.9), so that every point the final patch
    reads lies inside the enlarged crop (16 -> 17) and the CPU and device paths read the same voxels."""
    for key in list(cfg.augment.keys()):
        if key.endswith("_probability"):
            cfg.augment[key] = 1.0
    cfg.augment.noise_probability = 0.0
    cfg.augment.mirror_probability = 0.5
    cfg.augment.blur_per_channel_probability = cfg.augment.lowres_per_channel_probability = 0.5
    cfg.augment.rotation_max_degrees = 3.0
    cfg.augment.scale_range = (0.7, 0.9)
    cfg.foreground_fraction = 0.5


def test_train_step_on_device_sees_the_cpu_paths_patches(tiny_config):
    """The same seed through the pipeline with and without data.augment_on_device: the host ships
    int16 boxes that hold every voxel the draws read, placed in slots by sharding.global_batch; the
    patches the device makes from them equal the CPU path's (same draws; within float32
    interpolation), and the real sharded train step gives the same loss and gradient norm."""
    from segguided_jax.parallel import sharding
    from segguided_jax.data.pipeline import train_dataset
    from segguided_jax.training.steps import sharded_steps

    cfg = tiny_config
    _all_but_noise(cfg.data)
    initial = aug.initial_patch_size(cfg.data.patch, cfg.data.augment)
    assert initial == (17, 17, 17)
    mesh = sharding.make_mesh(cfg.mesh)
    cpu_cfg, dev_cfg = cfg, cfg.copy_and_resolve_references()
    dev_cfg.data.augment_on_device = True
    cpu_steps, dev_steps = sharded_steps(cpu_cfg, mesh), sharded_steps(dev_cfg, mesh)
    cpu = iter(train_dataset(cfg.data.dir, cpu_cfg.data, seed=3, batch_size=2))
    dev_it = iter(train_dataset(cfg.data.dir, dev_cfg.data, seed=3, batch_size=2))
    augment = jax.jit(functools.partial(dev.augment_boxes, data_cfg=dev_cfg.data))
    half = (np.asarray(cfg.data.patch) - 1) / 2
    centre = (np.asarray(initial) - cfg.data.patch) // 2 + half  # augment_boxes'
    grid = np.stack(np.meshgrid(*[np.arange(p) for p in cfg.data.patch], indexing="ij"), -1).reshape(-1, 3)
    for _ in range(2):
        want, got = next(cpu), next(dev_it)
        boxes = got["box"]
        assert got["image"].dtype == np.int16 and got["image"].shape == (np.prod(boxes[:, 4:], axis=1).sum(), 4)
        assert got["label"].shape == got["image"].shape[:1] and got["augment"].shape == (2, dev.draws_size(4))
        assert list(got.pop("case_id")) == list(want.pop("case_id"))
        for row, box in zip(got["augment"], boxes):
            points = (grid - half) @ dev.unpack(row, 4)["matrix"].reshape(3, 3).T + centre
            assert points.min() >= 0 and points.max() <= initial[0] - 1  # every read inside the crop
            assert (np.floor(points.min(0)) >= box[1:4]).all()  # and inside the box shipped
            assert (np.minimum(np.floor(points.max(0)) + 1, initial[0] - 1) <= box[1:4] + box[4:] - 1).all()
        placed = sharding.global_batch(got, mesh, dev_steps.batch)
        assert placed["image"].shape == (2, 17 ** 3, 4) and placed["image"].dtype == jnp.int16
        for r, box in enumerate(boxes):  # each row at the start of its slot, the rest 0
            n = int(np.prod(box[4:]))
            np.testing.assert_array_equal(np.asarray(placed["image"][r, :n]), got["image"][box[0]: box[0] + n])
            assert not np.asarray(placed["image"][r, n:]).any()
        image, label = augment(placed["image"], placed["label"], placed["box"], placed["norm"], placed["augment"])
        assert (np.asarray(label) == want["label"]).mean() > 0.99  # float32 against float64 at rounding ties
        np.testing.assert_allclose(np.asarray(image), want["image"], atol=1e-4)
        _, cpu_metrics = cpu_steps.step(cpu_steps.init(), sharding.global_batch(want, mesh, cpu_steps.batch))
        _, dev_metrics = dev_steps.step(dev_steps.init(), placed)
        for key in ("loss", "loss_seg", "loss_aux", "grad_norm"):
            assert float(dev_metrics[key]) == pytest.approx(float(cpu_metrics[key]), rel=1e-5), key


def _label_box(case, first, edges):
    out = np.zeros(tuple(edges), np.uint8)
    a, b = np.maximum(first, 0), np.minimum(first + edges, case.shape)
    out[tuple(slice(x - f, y - f) for x, y, f in zip(a, b, first))] = case.label[tuple(slice(x, y) for x, y in zip(a, b))]
    return out.reshape(-1)


def test_boxes_give_the_whole_crops_patches():
    """An int16 case: the boxes `reach` ships (int16, or float32 raw) give the patches that the
    whole enlarged crop, normalised on the host, gives (labels exactly; images to float32
    rounding: XLA may contract the normalisation and the interpolation differently in the two
    programs), for rotations and scalings up to the config's limits; the boxes are smaller."""
    from segguided_jax.data import records
    from segguided_jax.data.transforms import enlarged_start

    rng = np.random.default_rng(5)
    raw = rng.integers(-300, 3000, (30, 28, 26, 2)).astype(np.int16)
    raw[:4] = 0  # background: all channels 0
    norm = np.array([[400.5, 123.25], [900.0, 250.5]])
    case = records.read_case(records.encode_case("c0", records.normalise(raw, norm),
                                                 rng.integers(0, 4, raw.shape[:3]).astype(np.uint8), norm=norm))
    assert case.stored_dtype == "int16"
    cfg = _data_cfg(rotation_probability=0.7, scale_probability=0.7, mirror_probability=0.5)
    initial = aug.initial_patch_size(PATCH, cfg.augment)
    whole, boxes = jax.jit(functools.partial(dev.augment_batch, data_cfg=cfg)), jax.jit(
        functools.partial(dev.augment_boxes, data_cfg=cfg))
    slot, shipped = int(np.prod(initial)), []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        start = enlarged_start(case.shape, PATCH, initial, rng)
        draws = dev.draw(rng, cfg.augment, 2)
        lo, edges = dev.reach(draws, PATCH, initial, 2)
        shipped.append(np.prod(edges) / slot)
        crop = np.moveaxis(np.stack(case.channel_boxes(np.maximum(start, 0), np.minimum(start + initial, case.shape))), 0, -1)
        full = np.zeros(initial + (2,), np.float32)
        full[tuple(slice(a - s, b - s) for a, b, s in zip(np.maximum(start, 0), np.minimum(start + initial, case.shape), start))] = crop
        label_full = np.zeros(initial, np.uint8)
        label_full[:] = _label_box(case, start, np.asarray(initial)).reshape(initial)
        ref = whole(full[None], label_full[None], draws[None])
        for dtype in ("int16", "float32"):
            box, _, stats = case.stored_box(start + lo, start + lo + edges, dtype)
            image = np.zeros((1, slot, 2), dtype)
            image[0, : box[..., 0].size] = box.reshape(-1, 2)
            geometry = np.concatenate([[0], lo, edges]).astype(np.int32)[None]
            label = np.zeros((1, slot), np.uint8)
            label[0, : box[..., 0].size] = _label_box(case, start + lo, edges)
            out = boxes(image, label, geometry, stats[None], draws[None])
            np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), rtol=4e-6, atol=1e-6,
                                       err_msg=f"seed {seed} {dtype}")
            np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))
    assert max(shipped) < 1 and np.mean(shipped) < 0.7
    with pytest.raises(ValueError, match="case c1 is stored as float32.*device_crop_dtype=float32"):
        records.read_case(records.encode_case("c1", np.full((4, 4, 4, 2), 0.3, np.float32), None)).stored_box(
            (0, 0, 0), (2, 2, 2), "int16")


def test_train_command_with_augment_on_device_resumes_bit_exact(tiny_config, tmp_path):
    """`python -m segguided_jax.train ... --config.data.augment_on_device=True` with rotation and
    scaling on, patches reaching past the case's borders (data.patch_overhang: the boxes read 0
    outside), the boxes shipped as float32 and the pipeline in a Grain worker process: stopped by
    SIGTERM (it checkpoints at the next step) and run again, it writes the same metrics.jsonl, row
    for row and bit for bit, as an uninterrupted run of the same config."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from configs import tiny
    from segguided_jax.training.loop import train_and_evaluate

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The boxes shipped as float32 and the pipeline in a Grain worker process, in both runs: float32
    # boxes give int16's patches only to float32 rounding (another program normalises them).
    overrides = {"data.augment_on_device": True, "data.device_crop_dtype": "float32", "data.num_workers": 1,
                 "data.augment.rotation_probability": 0.5,
                 "data.augment.scale_probability": 0.5, "data.augment.bias_field_probability": 0.5,
                 "data.patch_overhang": 0.5, "train.steps": 12, "train.log_every": 1,
                 "train.eval_every": 12, "checkpoint.every_steps": 1000}
    cfg = tiny.get_config()
    cfg.data.dir = tiny_config.data.dir
    for key, value in overrides.items():
        section, *rest = key.split(".")
        node = cfg[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    train_and_evaluate(cfg, str(tmp_path / "whole"))

    workdir = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.dir={cfg.data.dir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, ".cache", "jax"))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0 and "preempted: saved a checkpoint at step" in rest, rest[-2000:]
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout

    def rows(run):
        with open(run / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    assert [r["step"] for r in rows(workdir) if "split" not in r] == list(range(1, 13))
    assert rows(workdir) == rows(tmp_path / "whole")
