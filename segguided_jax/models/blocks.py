"""Building blocks of SegGuidedNet. All tensors are channels-last: (N, D, H, W, C)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# He (Kaiming) initialisation for convolutions followed by a leaky ReLU, as in the paper's recipe.
he_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def _tiles(kernel_size, strides, spatial=None) -> bool:
    """True when a convolution's windows tile its input exactly (kernel = stride: 1³, or 2³ with
    stride 2, on spatial sizes divisible by the kernel), so that it is a matmul after a
    space-to-depth reshape."""
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (strides,) * 3 if isinstance(strides, int) else tuple(strides)
    return k == s and (spatial is None or all(n % kk == 0 for n, kk in zip(spatial, k)))


_DN = ("NDHWC", "DHWIO", "NDHWC")
# The CPU-only formulations below (weight-gradient scan, strided convs as patches) are chosen at
# lowering time with lax.platform_dependent, so accelerators never run them. False turns them off
# on CPU too (benchmarks/hlo_cost.py: to compile the program an accelerator gets).
CPU_REWRITES = True
# A 3³ convolution's weight gradient is a convolution whose kernel is the whole activation. XLA's
# CPU backend (oneDNN included) spends ~2.6x the scan's CPU time on it at 64³ x 16 channels, and
# between 1x and 1.3x at 32³ x 32 over repeated runs (benchmarks/conv_wgrad.py); so the scan is
# used on CPU for large, narrow activations only, and never on accelerators.
_SCAN_MIN_VOXELS = 2**17  # per sample (above ~50³)
_SCAN_MAX_CHANNELS = 32 * 32  # C_in x C_out
_SCAN_CHUNK = 2048  # output voxels per step: the step's 27·C_in x chunk patch matrix stays in L3 cache


def conv3_weight_grad_scan(x, g, chunk=_SCAN_CHUNK):
    """Weight gradient of a 3³, stride-1, SAME convolution: dW[a,b,c,i,o] = Σ x[n, d+a-1, h+b-1,
    w+c-1, i] · g[n, d, h, w, o], for x (N, D, H, W, C_in), g (N, D, H, W, C_out) channels-last;
    returns (3, 3, 3, C_in, C_out) in float32.

    x goes channels-first and zero-padded, flattened to (C_in, L); on that flat grid a kernel tap
    is a fixed offset, so the patch matrix of `chunk` consecutive output positions is 27 row
    slices of a window of x. A scan over chunks multiplies each (27·C_in, chunk) patch matrix by
    the matching (chunk, C_out) rows of g, zero-padded alike (padding positions add nothing), as
    a plain row-major matmul, and accumulates in float32."""
    n, d, h, w, cin = x.shape
    cout = g.shape[-1]
    hp, wp = h + 2, w + 2
    margin = hp * wp + wp + 1  # largest |offset| of a tap
    offsets = [(a - 1) * hp * wp + (b - 1) * wp + (c - 1) for a in range(3) for b in range(3) for c in range(3)]
    pad = ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0))
    xt = jnp.pad(x, pad).transpose(4, 0, 1, 2, 3).reshape(cin, -1)
    gp = jnp.pad(g, pad).reshape(-1, cout)
    steps = -(-(xt.shape[1] - 2 * margin) // chunk)
    total = steps * chunk + 2 * margin
    xt = jnp.pad(xt, ((0, 0), (0, total - xt.shape[1])))
    gp = jnp.pad(gp, ((0, total - gp.shape[0]), (0, 0)))

    def body(acc, i):
        start = i * chunk
        window = jax.lax.dynamic_slice_in_dim(xt, start, chunk + 2 * margin, axis=1)
        patches = jnp.concatenate(
            [jax.lax.slice_in_dim(window, margin + o, margin + o + chunk, axis=1) for o in offsets], axis=0)
        rows = jax.lax.dynamic_slice_in_dim(gp, start + margin, chunk, axis=0)
        return acc + jnp.dot(patches, rows, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(body, jnp.zeros((27 * cin, cout), jnp.float32), jnp.arange(steps))
    return acc.reshape(3, 3, 3, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3(x, kernel, precision):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=_DN, precision=precision)


def _conv3_fwd(x, kernel, precision):
    return _conv3(x, kernel, precision), (x, kernel)


def _conv3_bwd(precision, res, g):
    x, kernel = res
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1, 1), padding="SAME",
                             dimension_numbers=_DN, precision=precision)
    dx = jax.vjp(lambda x: conv(x, kernel), x)[1](g)[0]

    def generic(x, g):
        return jax.vjp(lambda k: conv(x, k), kernel)[1](g)[0]

    def scan(x, g):
        return conv3_weight_grad_scan(x, g).astype(kernel.dtype)

    return dx, jax.lax.platform_dependent(x, g, cpu=scan, default=generic)


_conv3.defvjp(_conv3_fwd, _conv3_bwd)


def _strided_patches_conv(x, kernel, strides, precision):
    """A SAME convolution with stride > 1 as patches and a matmul: the k³ strided slices of the
    padded input side by side ((N, D/s, H/s, W/s, k³·C_in), the kernel's (a, b, c, C_in) order)
    times the (k³·C_in, C_out) kernel. On CPU, XLA's gradients of a strided convolution (an
    input-dilated convolution for the input, a kernel-dilated one for the weights) miss oneDNN
    and run on a generic path; the patch form's gradients are a matmul and strided pads."""
    n, *spatial, c = x.shape
    k = kernel.shape[:3]
    out = [-(-size // st) for size, st in zip(spatial, strides)]
    total = [max((o - 1) * st + kk - size, 0) for o, st, kk, size in zip(out, strides, k, spatial)]
    x = jnp.pad(x, [(0, 0)] + [(t // 2, t - t // 2) for t in total] + [(0, 0)])
    patches = jnp.concatenate([
        jax.lax.slice(x, (0, a, b, e, 0),
                      (n, a + (out[0] - 1) * strides[0] + 1, b + (out[1] - 1) * strides[1] + 1,
                       e + (out[2] - 1) * strides[2] + 1, c), (1, *strides, 1))
        for a in range(k[0]) for b in range(k[1]) for e in range(k[2])], axis=-1)
    return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]), precision=precision)


class Conv(nnx.Conv):
    """nnx.Conv (same parameters, same results) that runs non-overlapping kernels — 1³, and
    stride-2 2³ downsampling — as a space-to-depth reshape and a matmul. XLA lowers those
    convolutions, and above all their weight gradients (a convolution whose kernel is the whole
    activation), to slow generic code on CPU; a dot and its transposes map onto the matmul
    libraries on every backend. Large, narrow 3³ stride-1 convolutions get their weight gradient
    from conv3_weight_grad_scan on CPU. Inputs (N, D, H, W, C), channels-last."""

    def __call__(self, x):
        if (CPU_REWRITES and tuple(self.kernel_size) == (3, 3, 3) and _tiles(1, self.strides) and self.padding == "SAME"
                and self.feature_group_count == 1 and x.shape[1] * x.shape[2] * x.shape[3] >= _SCAN_MIN_VOXELS
                and self.in_features * self.out_features <= _SCAN_MAX_CHANNELS):
            kernel = self.kernel[...]
            bias = self.bias[...] if self.bias is not None else None
            x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
            y = _conv3(x, kernel, self.precision)
            return y if bias is None else y + bias
        strides = (self.strides,) * 3 if isinstance(self.strides, int) else tuple(self.strides)
        if (CPU_REWRITES and max(strides) > 1 and self.padding == "SAME" and self.feature_group_count == 1
                and not _tiles(self.kernel_size, strides, x.shape[1:4])):
            kernel = self.kernel[...]
            bias = self.bias[...] if self.bias is not None else None
            x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
            conv = functools.partial(jax.lax.conv_general_dilated, window_strides=strides, padding="SAME",
                                     dimension_numbers=_DN, precision=self.precision)
            y = jax.lax.platform_dependent(
                x, kernel, cpu=functools.partial(_strided_patches_conv, strides=strides, precision=self.precision),
                default=conv)
            return y if bias is None else y + bias
        if (not _tiles(self.kernel_size, self.strides, x.shape[1:4]) or self.feature_group_count != 1
                or self.padding not in ("SAME", "VALID")):
            return super().__call__(x)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        n, d, h, w, c = x.shape
        a, b, e = kernel.shape[:3]
        if (a, b, e) != (1, 1, 1):
            # Each output voxel's a·b·e input voxels become one row of a·b·e·C features, in the
            # kernel's (a, b, e, C) order.
            x = x.reshape(n, d // a, a, h // b, b, w // e, e, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
            x = x.reshape(n, d // a, h // b, w // e, a * b * e * c)
        y = jnp.dot(x, kernel.reshape(-1, kernel.shape[-1]), precision=self.precision)
        return y if bias is None else y + bias


class ConvTranspose(nnx.ConvTranspose):
    """nnx.ConvTranspose (same parameters, same results) that runs a kernel equal to its stride
    (2³, stride 2, VALID) as a matmul to k³·C_out features and a depth-to-space reshape: each
    input voxel writes its own k³ output block, with no overlap. XLA's transposed-conv gradients
    are slow on GPU and CPU alike; the matmul form has none."""

    def __call__(self, x):
        if (not _tiles(self.kernel_size, self.strides) or self.padding != "VALID"
                or self.transpose_kernel):
            return super().__call__(x)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        n, d, h, w, c = x.shape
        a, b, e, _, cout = kernel.shape
        # lax.conv_transpose (no kernel transposition) gives output offset t within a block the
        # kernel tap k - 1 - t, hence the flip.
        k = kernel[::-1, ::-1, ::-1].transpose(3, 0, 1, 2, 4).reshape(c, a * b * e * cout)
        y = jnp.dot(x, k, precision=self.precision).reshape(n, d, h, w, a, b, e, cout)
        y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, d * a, h * b, w * e, cout)
        return y if bias is None else y + bias


def upsample_linear_x2(x):
    """×2 trilinear upsampling of (N, D, H, W, C), equal to jax.image.resize(x, 2× shape,
    "trilinear") (half-pixel centres; the edge voxel repeats): per axis, output 2i is
    0.75·x[i] + 0.25·x[i-1] and 2i+1 is 0.75·x[i] + 0.25·x[i+1]. jax.image.resize contracts a
    dense (2n × n) weight matrix per axis, O(n) multiply-adds per output value where this takes
    two; computed in float32, returned in x's dtype."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    for axis in (1, 2, 3):
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
            return upsample_linear_x2(self.conv(x))
        return self.conv(x)


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
        z = self.to_maps(f)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        a = jax.nn.sigmoid(z)
        if self.stop_gradient:
            a = jax.lax.stop_gradient(a)
        g = jax.nn.sigmoid(self.to_gate(a))
        return f * g + f, z
