"""How each backend runs a convolution or a stage: the one place that chooses a formulation per backend.

The network (blocks.py) is written with plain layers; blocks.Conv and blocks.ConvTranspose hand
every call to conv() / conv_transpose() here, blocks.ConvNormAct, blocks.Upsample and
blocks.SegAttentionGate to conv_norm_act() / upsample() / attention_gate(), and network.py each
residual block to residual_block(); each returns the same values (same parameters, same math)
computed the way the backend runs fastest. The choices, each with its measured reason:

| convolution | backend | formulation | why (measured) |
|---|---|---|---|
| kernel = stride (1³; 2³ stride 2) | all | space-to-depth reshape + matmul | XLA lowers these convolutions, and above all their weight gradients (a convolution whose kernel is the whole activation), to slow generic code on CPU; a dot and its transposes map onto the matmul libraries on every backend |
| transposed 2³ stride 2 | all | matmul to 8·C_out + depth-to-space | XLA's transposed-conv gradients are slow on GPU and CPU alike (H100, brats21: 595 against 73 ms per step with resize) |
| 3³ stride 1, ≥ 2¹⁷ voxels, C_in·C_out ≤ 32² | CPU | weight gradient as a chunked scan of patch matrices | XLA's CPU lowering (oneDNN included) spends ~2.6x the scan's time at 64³ x 16 channels (benchmarks/conv_wgrad.py) |
| stride 2, kernel 3³ | CPU | k³ strided slices + matmul | the strided convolution's gradients (input- and kernel-dilated convolutions) miss oneDNN on CPU |
| everything else | all | lax.conv_general_dilated | |

And for whole layers and blocks:

| stage | backend | formulation | why (measured) |
|---|---|---|---|
| residual blocks, conv–norm–act (stem, downsampling), resize upsampling; gates and 1³ convolutions on fewer than 128 channels (TPU_FOLD) | TPU | the folded layout: W folded into the channels to fill the 128 lanes (fold_factor: 4 at 32 channels, 2 at 64, 1 from 128) and the W blocks moved into the batch, (N, D, H, W, C) -> (N·W/f, D, H, f·C); each 3³ convolution a 2-D (3, 3) one over D, H whose input channels also carry the W neighbours' sub-positions its taps reach (folded_conv), instance norm over channels and sub-positions (folded_instance_norm) | a TPU lays the minor dimension out in 128-wide lanes, and with a batch of 2 XLA rewrote 3-D convolutions with halo copies of the activation; brats21 at 128³, batch 2, v5p: 270 → 64 GiB accessed per sample, peak 42.4 → 9.5 GiB, cost model 7.9 → 25.2 patches/s (docs/tpu.md) |
| residual blocks of ≥ TPU_REMAT_MIN_VOXELS voxels (default: none) | TPU | under jax.checkpoint: only the block's input is kept for the backward pass, the rest recomputed | for patches too large for a chip's HBM; brats21's batch 2 fits a v5e (16 GiB) without it |
| all of the above | others | as written | |

Backend choices are made at lowering time with lax.platform_dependent, so each backend runs only
its own (the CPU program is the same with and without the TPU formulations); only the platforms a
program can be lowered for here are traced (_by_platform: code that compiles for a TPU or GPU
topology from a CPU host, or exports for several platforms, says so with may_lower_for). CPU_REWRITES = False turns them off on CPU too (benchmarks/hlo_cost.py: to compile the
program an accelerator gets). All tensors are channels-last: (N, D, H, W, C).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

def _tiles(kernel_size, strides, spatial=None) -> bool:
    """True when a convolution's windows tile its input exactly (kernel = stride: 1³, or 2³ with
    stride 2, on spatial sizes divisible by the kernel), so that it is a matmul after a
    space-to-depth reshape."""
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (strides,) * 3 if isinstance(strides, int) else tuple(strides)
    return k == s and (spatial is None or all(n % kk == 0 for n, kk in zip(spatial, k)))


_DN = ("NDHWC", "DHWIO", "NDHWC")
CPU_REWRITES = True
# Residual blocks with at least this many voxels per sample run under jax.checkpoint on TPU (None:
# none, 0: all): for patches larger than a chip's HBM holds. With the folded layout none is needed
# for brats21 (batch 2 takes 9.4 of a v5e's 16 GiB; 192³ volumes split over 2 or 4 v5e chips take
# 8.5 GiB, docs/tpu.md); rematerialising every block cost 8 % more bytes at 64³ (5-D fold).
TPU_REMAT_MIN_VOXELS = None
# None: each backend gets its own formulation (lax.platform_dependent, decided when the program is
# lowered for its platform). "tpu": the TPU formulations everywhere, so that a CPU test can compare
# them with the plain ones.
FORCE_PLATFORM = None

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

    return dx, _by_platform(x, g, cpu=scan, default=generic)


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
    x = jnp.pad(x, [(0, 0)] + [_same_padding(size, kk, st) for size, kk, st in zip(spatial, k, strides)] + [(0, 0)])
    patches = jnp.concatenate([
        jax.lax.slice(x, (0, a, b, e, 0),
                      (n, a + (out[0] - 1) * strides[0] + 1, b + (out[1] - 1) * strides[1] + 1,
                       e + (out[2] - 1) * strides[2] + 1, c), (1, *strides, 1))
        for a in range(k[0]) for b in range(k[1]) for e in range(k[2])], axis=-1)
    return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]), precision=precision)




def _operands(layer, x):
    kernel = layer.kernel[...]
    bias = layer.bias[...] if layer.bias is not None else None
    return layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)


def conv(layer, x, plain):
    """layer (an nnx.Conv) applied to x (N, D, H, W, C) in its backend's formulation; plain(x) is
    the layer's own nnx.Conv call, used where no other formulation is chosen."""
    f = fold_factor(layer.in_features, x.shape[3]) if TPU_FOLD else 1
    if f > 1 and tuple(layer.kernel_size) == (1, 1, 1) and _tiles(1, layer.strides) and layer.feature_group_count == 1:
        return _on_tpu(x, lambda x: _unfold(folded_conv(layer, _fold(x, f), x.shape[0], f, f), f, x.shape[0]),
                       lambda x: _conv_default(layer, x, plain))
    return _conv_default(layer, x, plain)


def _conv_default(layer, x, plain):
    if (CPU_REWRITES and tuple(layer.kernel_size) == (3, 3, 3) and _tiles(1, layer.strides) and layer.padding == "SAME"
            and layer.feature_group_count == 1 and x.shape[1] * x.shape[2] * x.shape[3] >= _SCAN_MIN_VOXELS
            and layer.in_features * layer.out_features <= _SCAN_MAX_CHANNELS):
        x, kernel, bias = _operands(layer, x)
        y = _conv3(x, kernel, layer.precision)
        return y if bias is None else y + bias
    strides = (layer.strides,) * 3 if isinstance(layer.strides, int) else tuple(layer.strides)
    if (CPU_REWRITES and max(strides) > 1 and layer.padding == "SAME" and layer.feature_group_count == 1
            and not _tiles(layer.kernel_size, strides, x.shape[1:4])):
        x, kernel, bias = _operands(layer, x)
        dense = functools.partial(jax.lax.conv_general_dilated, window_strides=strides, padding="SAME",
                                  dimension_numbers=_DN, precision=layer.precision)
        y = _by_platform(
            x, kernel, cpu=functools.partial(_strided_patches_conv, strides=strides, precision=layer.precision),
            default=dense)
        return y if bias is None else y + bias
    if (not _tiles(layer.kernel_size, layer.strides, x.shape[1:4]) or layer.feature_group_count != 1
            or layer.padding not in ("SAME", "VALID")):
        return plain(x)
    x, kernel, bias = _operands(layer, x)
    n, d, h, w, c = x.shape
    a, b, e = kernel.shape[:3]
    if (a, b, e) != (1, 1, 1):
        # Each output voxel's a·b·e input voxels become one row of a·b·e·C features, in the
        # kernel's (a, b, e, C) order.
        x = x.reshape(n, d // a, a, h // b, b, w // e, e, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(n, d // a, h // b, w // e, a * b * e * c)
    y = jnp.dot(x, kernel.reshape(-1, kernel.shape[-1]), precision=layer.precision)
    return y if bias is None else y + bias


def conv_transpose(layer, x, plain):
    """layer (an nnx.ConvTranspose) applied to x (N, D, H, W, C): a kernel equal to its stride (2³,
    stride 2, VALID) as a matmul to k³·C_out features and a depth-to-space reshape, each input
    voxel writing its own k³ output block; plain(x) (the layer's own call) otherwise."""
    if not _tiles(layer.kernel_size, layer.strides) or layer.padding != "VALID" or layer.transpose_kernel:
        return plain(x)
    x, kernel, bias = _operands(layer, x)
    n, d, h, w, c = x.shape
    a, b, e, _, cout = kernel.shape
    # lax.conv_transpose (no kernel transposition) gives output offset t within a block the
    # kernel tap k - 1 - t, hence the flip.
    k = kernel[::-1, ::-1, ::-1].transpose(3, 0, 1, 2, 4).reshape(c, a * b * e * cout)
    y = jnp.dot(x, k, precision=layer.precision).reshape(n, d, h, w, a, b, e, cout)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, d * a, h * b, w * e, cout)
    return y if bias is None else y + bias


# On TPU an array's minor dimension is laid out in 128-wide lanes: a channels-last activation with
# C < 128 channels wastes 1 - C/128 of every vector register and HBM tile it touches. Folding f
# neighbouring voxels along W into the channels fills the lanes; the W blocks then go into the
# batch: (N, D, H, W, C) -> (N·W/f, D, H, f·C), "the folded layout". Each 3³ convolution becomes a
# 2-D (3, 3) convolution over D, H whose input channels also carry the one or two W-neighbour
# sub-positions that the W taps reach, with a kernel built from the layer's own; so the
# parameters and the values stay those of the plain network. Keeping W out of the convolution's
# spatial dimensions also gives XLA a large batch (N·W/f): with batch 2 it rewrote the 3-D
# convolutions with halo copies of the activation (docs/tpu.md).
TPU_FOLD_LANES = 128
TPU_FOLD = True


def fold_factor(channels: int, width: int) -> int:
    """Voxels along W folded into the channels so that f·channels fills TPU_FOLD_LANES (1: none)."""
    if channels >= TPU_FOLD_LANES or TPU_FOLD_LANES % channels:
        return 1
    f = TPU_FOLD_LANES // channels
    return f if width % f == 0 else 1


def _fold(x, f):
    """(N, D, H, W, C) -> the folded layout (N·W/f, D, H, f·C)."""
    n, d, h, w, c = x.shape
    return x.reshape(n, d, h, w // f, f * c).transpose(0, 3, 1, 2, 4).reshape(n * (w // f), d, h, f * c)


def _unfold(x, f, n):
    """The folded layout (N·W/f, D, H, f·C) of a batch of n -> (N, D, H, W, C)."""
    nw, d, h, fc = x.shape
    return x.reshape(n, nw // n, d, h, fc).transpose(0, 2, 3, 1, 4).reshape(n, d, h, (nw // n) * f, fc // f)


def _same_padding(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _folded_w(kernel_w: int, stride: int, pad_lo: int, f_in: int, f_out: int):
    """A convolution along W (kernel_w taps, stride, pad_lo zeros before the first voxel) between
    an input folded by f_in and an output folded by f_out = f_in / stride, block by block: fine
    output f_out·u + t reads fine input f_in·u + stride·t + tap - pad_lo, which is sub-position s
    of input block u + off. Returns (off_min, E[off - off_min, s, t, tap] in {0, 1})."""
    if stride * f_out != f_in:
        raise ValueError(f"no folded form: stride {stride}, fold {f_in} -> {f_out}")
    hits = [(t, tap, *divmod(stride * t + tap - pad_lo, f_in)) for t in range(f_out) for tap in range(kernel_w)]
    off_min = min(h[2] for h in hits)
    off_max = max(h[2] for h in hits)
    e = np.zeros((off_max - off_min + 1, f_in, f_out, kernel_w), np.float32)
    for t, tap, off, s in hits:
        e[off - off_min, s, t, tap] = 1.0
    return off_min, e


def folded_conv(layer, x, n, f_in, f_out):
    """layer (an nnx.Conv, SAME or VALID padding, no groups) applied to x, a batch of n in the
    folded layout by f_in (n·W/f_in, D, H, f_in·C_in); returns its output folded by f_out:
    (n·W'/f_out, D', H', f_out·C_out). Equal to _fold(layer(_unfold(x, f_in, n)), f_out).

    The W blocks of input and output correspond one to one (the caller's folds give
    stride·f_out = f_in); each output block reads sub-positions of its own input block and of
    the blocks `off` = ±1 away, which go into the channels (shifted along the batch, zeros past
    the edge), so the convolution runs over D and H only."""
    x, kernel, bias = _operands(layer, x)
    ks = tuple(kernel.shape[:3])
    strides = (layer.strides,) * 3 if isinstance(layer.strides, int) else tuple(layer.strides)
    blocks = x.shape[0] // n
    width = blocks * f_in
    if layer.padding == "SAME":
        pads = [_same_padding(size, k, s) for size, k, s in zip((x.shape[1], x.shape[2], width), ks, strides)]
    elif layer.padding == "VALID":
        pads = [(0, 0)] * 3
    else:
        raise ValueError(f"no folded form for padding {layer.padding!r}")
    off_min, e = _folded_w(ks[2], strides[2], pads[2][0], f_in, f_out)
    if (width + sum(pads[2]) - ks[2]) // strides[2] + 1 != blocks * f_out:
        raise ValueError(f"no folded form: stride {strides[2]}, fold {f_in} -> {f_out}, width {width}")
    cin, cout = kernel.shape[3], kernel.shape[4]
    # (Only the batch is split, never the lanes: splitting f_in·C_in into (f_in, C_in) would
    # make XLA lay out C_in-wide arrays, each padded to whole 128-lane tiles.)
    xb = x.reshape(n, blocks, *x.shape[1:])
    parts, rows = [], []
    for i in range(e.shape[0]):
        used = np.flatnonzero(e[i].any(axis=(1, 2)))
        if not used.size:
            continue
        lo, hi, off = int(used[0]), int(used[-1]) + 1, off_min + i
        part = xb[..., lo * cin:hi * cin]
        if off:  # the block `off` away; zeros past either end of W
            part = jax.lax.slice_in_dim(part, max(off, 0), blocks + min(off, 0), axis=1)
            part = jnp.pad(part, [(0, 0), (max(-off, 0), max(off, 0))] + [(0, 0)] * 3)
        parts.append(part.reshape(n * blocks, *x.shape[1:3], (hi - lo) * cin))
        rows.append(e[i, lo:hi])
    xe = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    sel = np.concatenate(rows)  # (input sub-positions used, f_out, kernel_w)
    # K[a, b, (r, i), (t, o)] = sum over W taps of sel[r, t, tap] · W[a, b, tap, i, o]
    k = jnp.einsum("rtk,abkio->abrito", jnp.asarray(sel, kernel.dtype), kernel)
    k = k.reshape(ks[0], ks[1], sel.shape[0] * cin, f_out * cout)
    y = jax.lax.conv_general_dilated(xe, k, strides[:2], pads[:2], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=layer.precision)
    return y if bias is None else y + jnp.tile(bias, f_out)


def folded_instance_norm(norm, x, n, f, slope=None):
    """norm (an nnx.InstanceNorm over the channels) applied to x, a batch of n in the folded
    layout by f, followed by a leaky ReLU of that slope when one is given: statistics per sample
    and channel over every voxel, sub-positions included, in float32 as nnx.InstanceNorm keeps
    them (E[x²] - E[x]²). Equal to _fold(leaky_relu(norm(_unfold(x, f, n))), f) within rounding."""
    c = x.shape[-1] // f
    x, scale, bias = norm.promote_dtype((x, norm.scale[...] if norm.scale else None,
                                         norm.bias[...] if norm.bias else None), dtype=norm.dtype)
    xf = x.astype(jnp.float32).reshape(n, -1, f, c)
    mean = jnp.mean(xf, axis=(1, 2))
    mean2 = jnp.mean(jnp.square(xf), axis=(1, 2))
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))
    mul = jax.lax.rsqrt(var + norm.epsilon)
    if scale is not None:
        mul = mul * scale
    shift = -mean * mul
    if bias is not None:
        shift = shift + bias
    y = (xf * mul[:, None, None] + shift[:, None, None]).astype(x.dtype).reshape(x.shape)
    return y if slope is None else jax.nn.leaky_relu(y, slope)


def _folded_residual_block(block, x):
    n = x.shape[0]
    f = fold_factor(min(x.shape[-1], block.conv2.out_features), x.shape[3])
    xf = _fold(x, f)
    h = folded_conv(block.conv1.conv, xf, n, f, f)
    h = folded_instance_norm(block.conv1.norm, h, n, f, block.conv1.slope)
    y = folded_instance_norm(block.norm2, folded_conv(block.conv2, h, n, f, f), n, f)
    skip = xf if block.skip_conv is None else folded_instance_norm(
        block.skip_norm, folded_conv(block.skip_conv, xf, n, f, f), n, f)
    return _unfold(jax.nn.leaky_relu(y + skip.astype(y.dtype), block.slope), f, n)


def _on_tpu(x, tpu, default):
    """tpu(x) in the program lowered for TPU, default(x) in every other (FORCE_PLATFORM = "tpu":
    tpu(x) everywhere)."""
    if FORCE_PLATFORM == "tpu":
        return tpu(x)
    return _by_platform(x, tpu=tpu, default=default)


# Platforms besides this process's own backend that programs traced here may be lowered for: a TPU
# slice or GPUs compiled for from a CPU host (compile_check's topology devices), a model exported
# for several platforms. See _by_platform.
_OTHER_PLATFORMS: set = set()


def may_lower_for(*platforms) -> None:
    """From now on, programs traced in this process may be lowered for these platforms too."""
    _OTHER_PLATFORMS.update(platforms)


@contextlib.contextmanager
def lowering_for(*platforms):
    """Inside, programs traced may be lowered for these platforms too (may_lower_for, undone on exit)."""
    added = set(platforms) - _OTHER_PLATFORMS
    _OTHER_PLATFORMS.update(added)
    try:
        yield
    finally:
        _OTHER_PLATFORMS.difference_update(added)


def _by_platform(*args, default, **per_platform):
    """jax.lax.platform_dependent(*args, default=default, **per_platform) over only the platforms a
    program traced here can be lowered for: this process's backend and those of may_lower_for /
    lowering_for. Where they all take one branch it is called directly, so the others are never
    traced: platform_dependent traces every branch, and the TPU formulations cost as much tracing
    as the plain network (the demo's train step: 4.0 s to trace with them, 0.9 s without, on the
    2-core CPU). The program lowered for a platform is the same either way (its optimised CPU
    HLO identical but for instruction numbering)."""
    own = jax.default_backend()
    platforms = {"cuda", "rocm"} if own == "gpu" else {own}
    taken = {per_platform.get(p, default) for p in platforms | _OTHER_PLATFORMS}
    if len(taken) == 1:
        return taken.pop()(*args)
    return jax.lax.platform_dependent(*args, default=default, **per_platform)


def _fold_pair(cin, cout, stride, width):
    """(f_in, f_out): the folds of a convolution's input and output along W (see fold_factor),
    with stride·f_out = f_in so that input and output W blocks correspond one to one (the folded
    layout keeps them in the batch); None where W does not divide into such blocks."""
    f_out = fold_factor(cout, -(-width // stride))
    f_in = stride * f_out
    return None if width % f_in else (f_in, f_out)


def conv_norm_act(module, x, plain):
    """module (blocks.ConvNormAct) applied to x: on TPU folded along W (input and output each to
    full lanes), elsewhere plain(x)."""
    c = module.conv
    stride = (c.strides,) * 3 if isinstance(c.strides, int) else tuple(c.strides)
    folds = _fold_pair(c.in_features, c.out_features, stride[2], x.shape[3]) if TPU_FOLD else None
    if folds is None:
        return plain(x)
    f_in, f_out = folds

    def tpu(x):
        n = x.shape[0]
        y = folded_instance_norm(module.norm, folded_conv(c, _fold(x, f_in), n, f_in, f_out), n, f_out, module.slope)
        return _unfold(y, f_out, n)

    return _on_tpu(x, tpu, plain)


def upsample(module, x, plain, resize):
    """module (blocks.Upsample in "resize" mode: a 1³ convolution, then ×2 trilinear upsampling
    by resize(x, axes)) applied to x (N, d, h, w, C_in): on TPU in the folded layout of the
    output's fold f (input blocks of f voxels along W, each giving two output blocks), elsewhere
    plain(x). resize's float32 arithmetic, axis by axis, W first (across each block's
    sub-positions and its neighbours', the edge voxel repeating) while D and H are still at the
    input's size, then D and H as resize does them: the same values to float32 rounding."""
    n, w = x.shape[0], x.shape[3]
    f = fold_factor(module.conv.out_features, 2 * w) if TPU_FOLD else 1
    if f == 1 or w % f:
        return plain(x)

    # W's interpolation as matmuls of whole lane tiles, one per block read: out = c·A + before·B
    # + after·B' for the blocks before and after (C-wide sub-position slices would each be
    # padded to 128 lanes). m[r, s, q]: the weight of input sub-position s of block r (0 before,
    # 1 own, 2 after) in output voxel q of the two output blocks.
    m = np.zeros((3, f, 2 * f), np.float32)
    for q in range(2 * f):
        for s, weight in ((q // 2, 0.75), (q // 2 + (1 if q % 2 else -1), 0.25)):
            m[1 + (s >= f) - (s < 0), s % f, q] += weight
    ch = module.conv.out_features

    def tpu(x):
        c = folded_conv(module.conv, _fold(x, f), n, f, f)  # (n·w/f, d, h, f·C)
        dtype, lanes = c.dtype, c.shape[-1]
        # The products are exact in one bfloat16 pass when c is bfloat16 (weights 0.75 and 0.25),
        # and the two terms of each output are summed in float32, as resize does.
        precision = jax.lax.Precision.DEFAULT if dtype == jnp.bfloat16 else jax.lax.Precision.HIGHEST
        cb = c.astype(jnp.float32).reshape(n, -1, *c.shape[1:])
        # The edge voxel repeats: before block 0 stands its own sub-position 0, after the last
        # block its own last one (moved to where the neighbour's would be).
        to_last = np.kron(np.eye(f, k=f - 1), np.eye(ch)).astype(np.float32)  # sub 0 -> sub f-1
        before = jnp.concatenate([jnp.dot(cb[:, :1], to_last, precision=precision), cb[:, :-1]], axis=1)
        after = jnp.concatenate([cb[:, 1:], jnp.dot(cb[:, -1:], to_last.T, precision=precision)], axis=1)
        out = sum(jnp.dot(v, np.kron(m[r], np.eye(ch)).astype(np.float32), precision=precision)
                  for r, v in enumerate((before, cb, after)))
        out = out.reshape(*cb.shape[:4], 2, lanes).transpose(0, 1, 4, 2, 3, 5)
        out = resize(out.reshape(-1, *out.shape[3:]), axes=(1, 2))
        return _unfold(out.astype(dtype), f, n)

    return _on_tpu(x, tpu, plain)


def attention_gate(gate, x, plain):
    """gate (blocks.SegAttentionGate) applied to x: on TPU folded along W, elsewhere plain(x).
    Returns (F·G + F, Z) as the gate does."""
    f = fold_factor(x.shape[-1], x.shape[3]) if TPU_FOLD else 1
    if f == 1:
        return plain(x)

    def tpu(x):
        n = x.shape[0]
        xf = _fold(x, f)
        z = folded_conv(gate.to_maps, xf, n, f, f)
        if gate.logit_scale != 1.0:
            z = z * gate.logit_scale
        a = jax.nn.sigmoid(z)
        if gate.stop_gradient:
            a = jax.lax.stop_gradient(a)
        g = jax.nn.sigmoid(folded_conv(gate.to_gate, a, n, f, f))
        return _unfold(xf * g + xf, f, n), _unfold(z, f, n)

    return _on_tpu(x, tpu, plain)


def residual_block(block, x):
    """block(x), one residual block of the network, as the backend runs it best: on TPU folded
    along W into full lanes (TPU_FOLD) and, from TPU_REMAT_MIN_VOXELS voxels up, under
    jax.checkpoint (the backward pass recomputes the block's activations from its input instead of
    keeping them in HBM); elsewhere as written. Same values either way."""
    remat = TPU_REMAT_MIN_VOXELS is not None and x.shape[1] * x.shape[2] * x.shape[3] >= TPU_REMAT_MIN_VOXELS
    if not (TPU_FOLD or remat):
        return block(x)

    def tpu(x):
        fn = functools.partial(_folded_residual_block, block) if TPU_FOLD else (lambda x: block(x))
        return jax.checkpoint(fn)(x) if remat else fn(x)

    return _on_tpu(x, tpu, lambda x: block(x))
