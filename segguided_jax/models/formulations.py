"""The formulations: how each backend computes the network's layers and blocks, and the
kernels they share.

Every layer and block of blocks.py holds its own forms side by side (its plain form, as written,
and where one pays its rewritten or folded TPU form) and a Formulation, which says which form runs
where. The Formulation is built from the config's model block when the model is built
(Formulation.from_config: model.formulation, model.cpu_rewrites, model.tpu_fold,
model.tpu_remat_min_voxels); it is a static attribute of every module, so jit's cache sees it.
Every form computes the same values (same parameters, same math) the way its backend runs fastest.
The choices, each with its measured reason:

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
| residual blocks, conv–norm–act (stem, downsampling), resize upsampling; gates and 1³ convolutions on fewer than 128 channels (tpu_fold) | TPU | the folded layout: W folded into the channels to fill the 128 lanes (fold_factor: 4 at 32 channels, 2 at 64, 1 from 128) and the W blocks moved into the batch, (N, D, H, W, C) -> (N·W/f, D, H, f·C); each 3³ convolution a 2-D (3, 3) one over D, H whose input channels also carry the W neighbours' sub-positions its taps reach (folded_conv), instance norm over channels and sub-positions (folded_instance_norm) | a TPU lays the minor dimension out in 128-wide lanes, and with a batch of 2 XLA rewrote 3-D convolutions with halo copies of the activation; brats21 at 128³, batch 2, v5p: 270 → 64 GiB accessed per sample, peak 42.4 → 9.5 GiB, cost model 7.9 → 25.2 patches/s (docs/tpu.md) |
| residual blocks of ≥ tpu_remat_min_voxels voxels (default: none) | TPU | under jax.checkpoint: only the block's input is kept for the backward pass, the rest recomputed | for patches too large for a chip's HBM; brats21's batch 2 fits a v5e (16 GiB) without it |
| all of the above | others | as written | |

Backend choices are made at lowering time with lax.platform_dependent, so each backend runs only
its own (the CPU program is the same with and without the TPU formulations); only the platforms a
program can be lowered for here are traced (_by_platform: code that compiles for a TPU or GPU
topology from a CPU host, or exports for several platforms, says so with may_lower_for).
Formulation(cpu_rewrites=False) turns the CPU rewrites off on CPU too (benchmarks/hlo_cost.py: to
compile the program an accelerator gets); Formulation(platform="tpu") runs the TPU forms on every
backend, so that a CPU test can compare them with the plain ones. All tensors are channels-last:
(N, D, H, W, C).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def tiles(kernel_size, strides, spatial=None) -> bool:
    """True when a convolution's windows tile its input exactly (kernel = stride: 1³, or 2³ with
    stride 2, on spatial sizes divisible by the kernel), so that it is a matmul after a
    space-to-depth reshape."""
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (strides,) * 3 if isinstance(strides, int) else tuple(strides)
    return k == s and (spatial is None or all(n % kk == 0 for n, kk in zip(spatial, k)))


DN = ("NDHWC", "DHWIO", "NDHWC")

# A 3³ convolution's weight gradient is a convolution whose kernel is the whole activation. XLA's
# CPU backend (oneDNN included) spends ~2.6x the scan's CPU time on it at 64³ x 16 channels, and
# between 1x and 1.3x at 32³ x 32 over repeated runs (benchmarks/conv_wgrad.py); so the scan is
# used on CPU for large, narrow activations only, and never on accelerators.
SCAN_MIN_VOXELS = 2**17  # per sample (above ~50³); Formulation.cpu_scan_min_voxels
SCAN_MAX_CHANNELS = 32 * 32  # C_in x C_out
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
def conv3(x, kernel, precision):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=DN, precision=precision)


def conv3_fwd(x, kernel, precision):
    return conv3(x, kernel, precision), (x, kernel)


def conv3_bwd(precision, res, g):
    x, kernel = res
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1, 1), padding="SAME",
                             dimension_numbers=DN, precision=precision)
    dx = jax.vjp(lambda x: conv(x, kernel), x)[1](g)[0]

    def generic(x, g):
        return jax.vjp(lambda k: conv(x, k), kernel)[1](g)[0]

    def scan(x, g):
        return conv3_weight_grad_scan(x, g).astype(kernel.dtype)

    return dx, _by_platform(x, g, cpu=scan, default=generic)


conv3.defvjp(conv3_fwd, conv3_bwd)


def strided_patches_conv(x, kernel, strides, precision):
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





def operands(layer, x):
    kernel = layer.kernel[...]
    bias = layer.bias[...] if layer.bias is not None else None
    return layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)



# On TPU an array's minor dimension is laid out in 128-wide lanes: a channels-last activation with
# C < 128 channels wastes 1 - C/128 of every vector register and HBM tile it touches. Folding f
# neighbouring voxels along W into the channels fills the lanes; the W blocks then go into the
# batch: (N, D, H, W, C) -> (N·W/f, D, H, f·C), "the folded layout". Each 3³ convolution becomes a
# 2-D (3, 3) convolution over D, H whose input channels also carry the one or two W-neighbour
# sub-positions that the W taps reach, with a kernel built from the layer's own; so the
# parameters and the values stay those of the plain network. Keeping W out of the convolution's
# spatial dimensions also gives XLA a large batch (N·W/f): with batch 2 it rewrote the 3-D
# convolutions with halo copies of the activation (docs/tpu.md).
TPU_LANES = 128
PLATFORMS = ("auto", "tpu")


@dataclasses.dataclass(frozen=True)
class Formulation:
    """Which form of each layer and block runs on which backend (the tables above).

    platform: "auto", each backend its own forms (lax.platform_dependent, decided when the program
      is lowered for its platform); "tpu", the TPU forms on every backend (tests compare them with
      the plain ones on CPU).
    cpu_rewrites: the CPU-only convolution forms (the weight-gradient scan, strided patches);
      cpu_scan_min_voxels the voxels per sample from which a 3³ convolution takes the scan.
    tpu_fold: the folded layout on TPU; tpu_fold_lanes the lanes it fills (a TPU's 128; tests fold
      the tiny widths into fewer).
    tpu_remat_min_voxels: residual blocks with at least this many voxels per sample run under
      jax.checkpoint on TPU (None: none, 0: all): for patches larger than a chip's HBM holds. With
      the folded layout none is needed for brats21 (batch 2 takes 9.4 of a v5e's 16 GiB; 192³
      volumes split over 2 or 4 v5e chips take 8.5 GiB, docs/tpu.md); rematerialising every block
      cost 8 % more bytes at 64³ (5-D fold).
    """
    platform: str = "auto"
    cpu_rewrites: bool = True
    cpu_scan_min_voxels: int = SCAN_MIN_VOXELS
    tpu_fold: bool = True
    tpu_fold_lanes: int = TPU_LANES
    tpu_remat_min_voxels: int | None = None

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"model.formulation must be one of {PLATFORMS}, got {self.platform!r}")
        if self.tpu_remat_min_voxels is not None and self.tpu_remat_min_voxels < 0:
            raise ValueError(f"model.tpu_remat_min_voxels must be None or >= 0, got {self.tpu_remat_min_voxels}")

    @classmethod
    def from_config(cls, model_cfg) -> "Formulation":
        """From the config's model block. Configs stored before these keys existed (a model file's)
        get the defaults, which computed every model until then."""
        get = model_cfg.get
        return cls(platform=get("formulation", "auto"), cpu_rewrites=bool(get("cpu_rewrites", True)),
                   tpu_fold=bool(get("tpu_fold", True)), tpu_remat_min_voxels=get("tpu_remat_min_voxels", None))

    def on_tpu(self, x, tpu, default):
        """tpu(x) in the program lowered for TPU, default(x) in every other (platform "tpu":
        tpu(x) everywhere)."""
        if self.platform == "tpu":
            return tpu(x)
        return _by_platform(x, tpu=tpu, default=default)

    def fold(self, channels: int, width: int) -> int:
        """The fold along W of an activation of this many channels and this width (1: none)."""
        return fold_factor(channels, width, self.tpu_fold_lanes) if self.tpu_fold else 1

    def fold_pair(self, cin, cout, stride, width):
        """(f_in, f_out): the folds of a convolution's input and output along W, with stride·f_out
        = f_in so that input and output W blocks correspond one to one (the folded layout keeps
        them in the batch); None where W does not divide into such blocks or folding is off."""
        if not self.tpu_fold:
            return None
        f_out = self.fold(cout, -(-width // stride))
        f_in = stride * f_out
        return None if width % f_in else (f_in, f_out)

    def remat(self, x) -> bool:
        """Whether a residual block on x runs under jax.checkpoint on TPU."""
        return (self.tpu_remat_min_voxels is not None
                and x.shape[1] * x.shape[2] * x.shape[3] >= self.tpu_remat_min_voxels)


def fold_factor(channels: int, width: int, lanes: int = TPU_LANES) -> int:
    """Voxels along W folded into the channels so that f·channels fills the lanes (1: none)."""
    if channels >= lanes or lanes % channels:
        return 1
    f = lanes // channels
    return f if width % f == 0 else 1


def fold_layout(x, f):
    """(N, D, H, W, C) -> the folded layout (N·W/f, D, H, f·C)."""
    n, d, h, w, c = x.shape
    return x.reshape(n, d, h, w // f, f * c).transpose(0, 3, 1, 2, 4).reshape(n * (w // f), d, h, f * c)


def unfold_layout(x, f, n):
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
    (n·W'/f_out, D', H', f_out·C_out). Equal to fold_layout(layer(unfold_layout(x, f_in, n)), f_out).

    The W blocks of input and output correspond one to one (the caller's folds give
    stride·f_out = f_in); each output block reads sub-positions of its own input block and of
    the blocks `off` = ±1 away, which go into the channels (shifted along the batch, zeros past
    the edge), so the convolution runs over D and H only."""
    x, kernel, bias = operands(layer, x)
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
    them (E[x²] - E[x]²). Equal to fold_layout(leaky_relu(norm(unfold_layout(x, f, n))), f) within rounding."""
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
