import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segguided_jax.inference.predictor import gaussian_weights, sliding_window, window_starts
from segguided_jax.evaluation.metrics import dice, region_dice


def test_window_starts_cover_volume_with_overlap():
    starts = window_starts((40, 16, 20), (16, 16, 16), 0.5)
    xs = sorted({s[0] for s in starts})
    assert xs[0] == 0 and xs[-1] == 40 - 16
    assert all(b - a <= 8 for a, b in zip(xs, xs[1:]))  # at least 50 % overlap
    assert sorted({s[1] for s in starts}) == [0]
    assert sorted({s[2] for s in starts}) == [0, 4]


def test_gaussian_weights_peak_at_centre_and_positive():
    g = gaussian_weights((16, 16, 16))
    assert g.max() == pytest.approx(1.0) and g[8, 8, 8] == pytest.approx(1.0)
    assert g.min() > 0


def test_sliding_window_of_a_pointwise_function_reproduces_it():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((23, 37, 12, 2)).astype(np.float32)  # z smaller than the window

    def predict(batch):  # a pointwise "network": every window agrees where windows overlap
        return jnp.tanh(batch[..., :1]) * 2

    out = sliding_window(predict, image, (16, 16, 16), 0.5, batch_size=3)
    assert out.shape == (23, 37, 12, 1)
    np.testing.assert_allclose(out, np.tanh(image[..., :1]) * 2, rtol=1e-5, atol=1e-6)


def test_dice_conventions():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0  # both empty
    b[0, 0] = True
    assert dice(a, b) == 0.0  # one empty
    a[0, :2] = True  # |A| = 2, |B| = 1, overlap 1
    assert dice(a, b) == pytest.approx(2 / 3)
    r = region_dice(np.stack([a, a, b], -1), np.stack([b, a, b], -1))
    assert r == pytest.approx({"dice_et": 2 / 3, "dice_tc": 1.0, "dice_wt": 1.0})


def test_mirroring_tta_and_attention_channels():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import tiny
    from segguided_jax.inference.predictor import mirror_sets, window_outputs
    from segguided_jax.models.network import build_model

    assert mirror_sets((0, 1, 2)) == [(), (0,), (1,), (0, 1), (2,), (0, 2), (1, 2), (0, 1, 2)]
    graphdef, params = nnx.split(build_model(tiny.get_config().model, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 4))

    def outputs(x, **kw):  # jitted, as the predictors run it: op by op it took 37 s, not seconds
        return jax.jit(functools.partial(window_outputs, graphdef, output="regions", **kw))(params, x)

    plain = outputs(x)
    assert plain.shape == (1, 16, 16, 16, 3)
    both = outputs(x, attention_stages=(-1,))
    assert both.shape == (1, 16, 16, 16, 6)
    np.testing.assert_allclose(both[..., :3], plain, atol=1e-6)
    assert float(both[..., 3:].min()) >= 0 and float(both[..., 3:].max()) <= 1
    # Mirrored TTA equals the mean of the explicitly flipped-back passes.
    tta = outputs(x, mirror_axes=(0,))
    flipped = outputs(jnp.flip(x, 1))
    np.testing.assert_allclose(tta, (plain + jnp.flip(flipped, 1)) / 2, atol=1e-5)
    # TTA of a flipped input equals the flipped TTA (the ensemble is mirror-symmetric).
    tta_of_flipped = outputs(jnp.flip(x, 1), mirror_axes=(0,))
    np.testing.assert_allclose(tta_of_flipped, jnp.flip(tta, 1), atol=1e-5)


def test_sliding_window_equals_whole_volume_forward_when_the_window_fits():
    import jax
    from flax import nnx

    from configs import tiny
    from segguided_jax.inference.predictor import window_outputs
    from segguided_jax.models.network import build_model

    graphdef, params = nnx.split(build_model(tiny.get_config().model, nnx.Rngs(0)))
    volume = np.random.default_rng(1).standard_normal((16, 16, 16, 4)).astype(np.float32)
    fwd = jax.jit(lambda b: window_outputs(graphdef, params, b, output="regions", attention_stages=(-1,)))
    whole = np.asarray(fwd(volume[None]))[0]
    windowed = sliding_window(fwd, volume, (16, 16, 16), 0.5, batch_size=2)
    np.testing.assert_allclose(windowed, whole, rtol=1e-5, atol=1e-6)
    # A volume smaller than the window is zero-padded, predicted, and cropped back.
    small = volume[:12, :16, :9]
    padded = np.zeros_like(volume)
    padded[:12, :16, :9] = small
    np.testing.assert_allclose(sliding_window(fwd, small, (16, 16, 16), 0.5, batch_size=2),
                               np.asarray(fwd(padded[None]))[0][:12, :16, :9], rtol=1e-5, atol=1e-6)


def test_volume_predictor_equals_window_outputs_on_the_host():
    """The device-side accumulation gives what the host-side formula gives."""
    import functools

    import jax
    from flax import nnx

    from configs import tiny
    from segguided_jax.parallel import sharding
    from segguided_jax.inference.predictor import VolumePredictor, gaussian_weights, window_outputs, window_starts
    from segguided_jax.models.network import build_model, forward

    cfg = tiny.get_config()
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(0)), nnx.Param)
    volume = np.random.default_rng(2).standard_normal((30, 21, 17, 4)).astype(np.float32)
    predictor = VolumePredictor(functools.partial(forward, graphdef, output="regions"), params, sharding.make_mesh(),
                                window=(16, 16, 16), overlap=0.5, batch_size=3, mirror_axes=(1,), attention_stages=(-1,))
    got = predictor(volume)
    padded = volume  # every dim >= the window: no padding
    acc = np.zeros(padded.shape[:3] + (6,))
    norm = np.zeros(padded.shape[:3])
    g = gaussian_weights((16, 16, 16))
    fwd = jax.jit(lambda b: window_outputs(graphdef, params, b, output="regions", mirror_axes=(1,),
                                           attention_stages=(-1,)))
    for x, y, z in window_starts(padded.shape[:3], (16, 16, 16), 0.5):
        out = np.asarray(fwd(padded[None, x:x + 16, y:y + 16, z:z + 16]))[0]
        acc[x:x + 16, y:y + 16, z:z + 16] += out * g[..., None]
        norm[x:x + 16, y:y + 16, z:z + 16] += g
    np.testing.assert_allclose(got, (acc / norm[..., None])[:30, :21, :17], rtol=1e-5, atol=1e-6)


def test_predictors_of_the_same_network_share_one_jitted_window_function():
    """Equal networks (equal graphdefs, other parameters) get the same jitted window step, so a
    process traces and compiles it once; another network, mirroring or mesh gets its own."""
    from configs import tiny
    from segguided_jax.parallel import sharding
    from segguided_jax.inference.predictor import window_function
    from segguided_jax.models.network import forward
    from segguided_jax.training.optim import make_optimizer
    from segguided_jax.training.steps import init_state

    cfg = tiny.get_config()
    tx = make_optimizer(cfg.optim, 8)
    a, b = init_state(0, cfg.model, tx), init_state(1, cfg.model, tx)
    cfg.model.widths = (4, 8, 32)
    other = init_state(0, cfg.model, tx)
    mesh = sharding.make_mesh()

    def fn(state, mirror=()):
        return window_function(functools.partial(forward, state.graphdef, output="regions"), mesh, mirror_axes=mirror)

    assert fn(a) is fn(b)
    assert fn(a) is not fn(other) and fn(a) is not fn(a, (0,))
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 16, 4)).astype(np.float32)
    # The shared function computes with the parameters it is given.
    direct = jax.jit(lambda p, v: forward(b.graphdef, p, v, output="regions")[0])(b.params, x)
    np.testing.assert_allclose(np.asarray(fn(b)(b.params, x)), np.asarray(direct), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(fn(a)(a.params, x)), np.asarray(direct))
