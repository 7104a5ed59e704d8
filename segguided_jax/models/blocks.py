"""Building blocks of SegGuidedNet. All tensors are channels-last: (N, D, H, W, C)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from segguided_jax.models import formulations

# He (Kaiming) initialisation for convolutions followed by a leaky ReLU, as in the paper's recipe.
he_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class Conv(nnx.Conv):
    """nnx.Conv (same parameters, same results), computed in the formulation
    models.formulations chooses for the backend."""

    def __call__(self, x):
        return formulations.conv(self, x, super().__call__)


class ConvTranspose(nnx.ConvTranspose):
    """nnx.ConvTranspose (same parameters, same results), computed in the formulation
    models.formulations chooses for the backend."""

    def __call__(self, x):
        return formulations.conv_transpose(self, x, super().__call__)


def upsample_linear_x2(x, axes=(1, 2, 3)):
    """×2 trilinear upsampling of (N, D, H, W, C), equal to jax.image.resize(x, 2× shape,
    "trilinear") (half-pixel centres; the edge voxel repeats): per axis, output 2i is
    0.75·x[i] + 0.25·x[i-1] and 2i+1 is 0.75·x[i] + 0.25·x[i+1]. jax.image.resize contracts a
    dense (2n × n) weight matrix per axis, O(n) multiply-adds per output value where this takes
    two; computed in float32, returned in x's dtype. axes: the axes doubled (the others stay)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    for axis in axes:
        n = x.shape[axis]
        edge = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
        prev = jnp.concatenate([edge(0, 1), edge(0, n - 1)], axis)
        nxt = jnp.concatenate([edge(1, n), edge(n - 1, n)], axis)
        pair = jnp.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis + 1)
        x = pair.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
    return x.astype(dtype)


def _conv(cin, cout, kernel, stride=1, *, dtype, rngs, use_bias=True):
    return Conv(cin, cout, (kernel,) * 3, (stride,) * 3, padding="SAME", use_bias=use_bias,
                kernel_init=he_init, dtype=dtype, rngs=rngs)


class ConvNormAct(nnx.Module):
    """conv(k³) -> InstanceNorm -> LeakyReLU."""

    def __init__(self, cin, cout, kernel=3, stride=1, *, slope, dtype, rngs):
        # The bias is redundant before instance norm, which removes the per-channel mean.
        self.conv = _conv(cin, cout, kernel, stride, dtype=dtype, rngs=rngs, use_bias=False)
        self.norm = nnx.InstanceNorm(cout, dtype=dtype, rngs=rngs)
        self.slope = slope

    def __call__(self, x):
        return formulations.conv_norm_act(self, x, self.plain)

    def plain(self, x):
        return jax.nn.leaky_relu(self.norm(self.conv(x)), self.slope)


class ResidualBlock(nnx.Module):
    """(conv3³–IN–LeakyReLU) ×2 with an identity skip, or a 1×1×1 conv + IN skip when widths differ."""

    def __init__(self, cin, cout, *, slope, dtype, rngs):
        self.conv1 = ConvNormAct(cin, cout, 3, slope=slope, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs, use_bias=False)
        self.norm2 = nnx.InstanceNorm(cout, dtype=dtype, rngs=rngs)
        if cin != cout:
            self.skip_conv = _conv(cin, cout, 1, dtype=dtype, rngs=rngs, use_bias=False)
            self.skip_norm = nnx.InstanceNorm(cout, dtype=dtype, rngs=rngs)
        else:
            self.skip_conv = None
            self.skip_norm = None
        self.slope = slope

    def __call__(self, x):
        y = self.norm2(self.conv2(self.conv1(x)))
        skip = x if self.skip_conv is None else self.skip_norm(self.skip_conv(x))
        return jax.nn.leaky_relu(y + skip, self.slope)


class Downsample(nnx.Module):
    """Stride-2 convolution. A 2³ kernel tiles the input exactly (no overlap), which is much
    cheaper on CPU; 3³ is the usual nnU-Net choice. The kernel size comes from the config."""

    def __init__(self, cin, cout, kernel, *, slope, dtype, rngs):
        self.block = ConvNormAct(cin, cout, kernel, 2, slope=slope, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.block(x)


class Upsample(nnx.Module):
    """×2 upsampling: a 2³ stride-2 transposed conv, or a 1³ conv and trilinear resize.

    The 1³ conv and the resize are both linear (the resize's weights sum to 1, so the bias passes
    through), so they commute: the conv runs before the resize, on 8× fewer voxels, and the resize
    moves C_out instead of C_in channels. Both modes are matmuls here (ConvTranspose, Conv)."""

    def __init__(self, cin, cout, mode, *, dtype, rngs):
        if mode not in ("transpose", "resize"):
            raise ValueError(f"model.upsample must be 'transpose' or 'resize', got {mode!r}")
        self.mode = mode
        if mode == "transpose":
            self.conv = ConvTranspose(cin, cout, (2, 2, 2), (2, 2, 2), padding="VALID",
                                      kernel_init=he_init, dtype=dtype, rngs=rngs)
        else:
            self.conv = _conv(cin, cout, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if self.mode == "resize":
            return formulations.upsample(self, x, self.plain, upsample_linear_x2)
        return self.conv(x)

    def plain(self, x):
        return upsample_linear_x2(self.conv(x))


class SegAttentionGate(nnx.Module):
    """The paper's gate on a decoder feature map F with C channels.

    Z = s·conv1³(F) gives K map logits (NCR, ED, ET) and A = sigmoid(Z) the maps in [0, 1];
    G = sigmoid(conv1³(A)) gives C channel gates; the output is F·G + F.
    Parameters: (C·K + K) + (K·C + C) = 2·K·C + K + C.

    logit_scale s multiplies the map conv's output (its initial weights are divided by s, so the
    initial maps do not change). Under Adam a weight moves by about the learning rate per step
    whatever its gradient's size, so s is the map conv's learning-rate multiplier: clean maps of
    sub-regions that cover < 1 % of a volume need logits of -5 to -10 away from them, which an
    unscaled 1³ conv does not reach in a short run.

    With stop_gradient the gate reads A through jax.lax.stop_gradient: the segmentation loss then
    trains F (and so what the maps see) and the gate conv, but cannot bend the maps themselves
    towards whatever helps the gate; the maps learn from the auxiliary loss alone.

    f: (N, D, H, W, C) in the compute dtype. Returns (F·G + F, Z): Z (N, D, H, W, K) logits in the
    compute dtype (a loss should take them, not A: sigmoid(Z) rounds to 1 in bfloat16 for Z ≳ 5.6).
    """

    def __init__(self, channels, num_maps, *, stop_gradient: bool = False, logit_scale: float = 1.0, dtype, rngs):
        # He init divided by logit_scale: at initialisation Z is what an unscaled conv would give.
        self.to_maps = nnx.Conv(channels, num_maps, (1, 1, 1), padding="SAME", dtype=dtype, rngs=rngs,
                                kernel_init=nnx.initializers.variance_scaling(2.0 / logit_scale ** 2, "fan_in",
                                                                              "truncated_normal"))
        self.to_gate = _conv(num_maps, channels, 1, dtype=dtype, rngs=rngs)
        self.stop_gradient = stop_gradient
        self.logit_scale = logit_scale

    def __call__(self, f):
        return formulations.attention_gate(self, f, self.plain)

    def plain(self, f):
        z = self.to_maps(f)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        a = jax.nn.sigmoid(z)
        if self.stop_gradient:
            a = jax.lax.stop_gradient(a)
        g = jax.nn.sigmoid(self.to_gate(a))
        return f * g + f, z
