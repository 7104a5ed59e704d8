"""How each backend runs a convolution: the one place that chooses a formulation per backend.

The network (blocks.py) is written with plain layers; blocks.Conv and blocks.ConvTranspose hand
every call to conv() / conv_transpose() here, which return the same values (same parameters,
same math) computed the way the backend runs fastest. The choices, each with its measured reason:

| convolution | backend | formulation | why (measured) |
|---|---|---|---|
| kernel = stride (1³; 2³ stride 2) | all | space-to-depth reshape + matmul | XLA lowers these convolutions, and above all their weight gradients (a convolution whose kernel is the whole activation), to slow generic code on CPU; a dot and its transposes map onto the matmul libraries on every backend |
| transposed 2³ stride 2 | all | matmul to 8·C_out + depth-to-space | XLA's transposed-conv gradients are slow on GPU and CPU alike (H100, brats21: 595 against 73 ms per step with resize) |
| 3³ stride 1, ≥ 2¹⁷ voxels, C_in·C_out ≤ 32² | CPU | weight gradient as a chunked scan of patch matrices | XLA's CPU lowering (oneDNN included) spends ~2.6x the scan's time at 64³ x 16 channels (benchmarks/conv_wgrad.py) |
| stride 2, kernel 3³ | CPU | k³ strided slices + matmul | the strided convolution's gradients (input- and kernel-dilated convolutions) miss oneDNN on CPU |
| everything else | all | lax.conv_general_dilated | |

And for a whole residual block (network.py calls residual_block() for each):

| stage | backend | formulation | why (measured) |
|---|---|---|---|
| residual block | TPU, when TPU_REMAT_BLOCKS | under jax.checkpoint: only its input is kept for the backward pass, the rest recomputed | off: brats21's batch-2 temporaries on v5e 34.3 → 20.3 GiB, still over 15.75; bytes not measured yet (docs/tpu.md) |
| residual block | others | as written | |

CPU-only choices are made at lowering time with lax.platform_dependent, so accelerators never
run them. CPU_REWRITES = False turns them off on CPU too (benchmarks/hlo_cost.py: to compile the
program an accelerator gets). All tensors are channels-last: (N, D, H, W, C).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

def _tiles(kernel_size, strides, spatial=None) -> bool:
    """True when a convolution's windows tile its input exactly (kernel = stride: 1³, or 2³ with
    stride 2, on spatial sizes divisible by the kernel), so that it is a matmul after a
    space-to-depth reshape."""
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (strides,) * 3 if isinstance(strides, int) else tuple(strides)
    return k == s and (spatial is None or all(n % kk == 0 for n, kk in zip(spatial, k)))


_DN = ("NDHWC", "DHWIO", "NDHWC")
CPU_REWRITES = True
# Off: alone it does not make brats21's batch 2 fit a v5e chip, and its cost in bytes and FLOPs is
# not measured yet (docs/tpu.md).
TPU_REMAT_BLOCKS = False
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




def _operands(layer, x):
    kernel = layer.kernel[...]
    bias = layer.bias[...] if layer.bias is not None else None
    return layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)


def conv(layer, x, plain):
    """layer (an nnx.Conv) applied to x (N, D, H, W, C) in its backend's formulation; plain(x) is
    the layer's own nnx.Conv call, used where no other formulation is chosen."""
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
        y = jax.lax.platform_dependent(
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


def residual_block(block, x):
    """block(x), one residual block of the network, as the backend runs it best: on TPU under
    jax.checkpoint (the backward pass recomputes the block's activations from its input instead of
    keeping them in HBM), elsewhere as written. Same values either way."""
    if not TPU_REMAT_BLOCKS:
        return block(x)
    remat = jax.checkpoint(lambda x: block(x))
    if FORCE_PLATFORM == "tpu":
        return remat(x)
    return jax.lax.platform_dependent(x, tpu=remat, default=lambda x: block(x))
