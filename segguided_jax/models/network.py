"""SegGuidedNet: a residual 3D encoder–decoder with a SegAttentionGate after every decoder stage."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segguided_jax.models.blocks import ConvNormAct, Downsample, ResidualBlock, SegAttentionGate, Upsample, _conv
from segguided_jax.models.formulations import Formulation
from segguided_jax.runtime import original_threefry

# Output channels of the head: sigmoid regions (ET, TC, WT) or softmax labels (bg, NCR, ED, ET).
OUTPUT_CHANNELS = {"regions": 3, "labels": 4}


class SegGuidedNet(nnx.Module):
    """x: (N, D, H, W, in_channels), D, H, W divisible by 2**(len(widths) - 1).

    Returns (logits, attention): logits (N, D, H, W, 3 or 4) float32; attention a tuple with one
    (N, d, h, w, num_maps) float32 array of attention-map *logits* per decoder stage, coarsest
    first (empty when gates are off). The maps themselves are jax.nn.sigmoid(attention[s]), in
    [0, 1]; losses take the logits (stable cross-entropy in float32 whatever the compute dtype),
    inference applies the sigmoid.

    formulation: which form of each block runs on which backend (models/formulations.py); the
    values are the same whichever.
    """

    def __init__(self, *, in_channels, widths, encoder_blocks, decoder_blocks, down_kernel,
                 upsample, gates, num_maps, output, leaky_slope, dtype, rngs, gate_stop_gradient=False,
                 gate_logit_scale=1.0, formulation: Formulation = Formulation()):
        if len(encoder_blocks) != len(widths) or len(decoder_blocks) != len(widths) - 1:
            raise ValueError("model.encoder_blocks needs one entry per width and model.decoder_blocks "
                             f"one per decoder stage; got widths={widths}, encoder_blocks={encoder_blocks}, "
                             f"decoder_blocks={decoder_blocks}")
        if output not in OUTPUT_CHANNELS:
            raise ValueError(f"model.output must be one of {sorted(OUTPUT_CHANNELS)}, got {output!r}")
        kw = dict(slope=leaky_slope, dtype=dtype, rngs=rngs, formulation=formulation)
        self.stem = ConvNormAct(in_channels, widths[0], 3, **kw)
        self.down = nnx.List([Downsample(widths[i - 1], widths[i], down_kernel, **kw)
                              for i in range(1, len(widths))])
        self.encoder = nnx.List([
            nnx.List([ResidualBlock(w, w, **kw) for _ in range(n)])
            for w, n in zip(widths, encoder_blocks)])
        up, dec, gate = [], [], []
        for j, i in enumerate(reversed(range(len(widths) - 1))):
            w = widths[i]
            up.append(Upsample(widths[i + 1], w, upsample, dtype=dtype, rngs=rngs, formulation=formulation))
            blocks = [ResidualBlock(2 * w, w, **kw)]
            blocks += [ResidualBlock(w, w, **kw) for _ in range(decoder_blocks[j] - 1)]
            dec.append(nnx.List(blocks))
            gate.append(SegAttentionGate(w, num_maps, stop_gradient=gate_stop_gradient, logit_scale=gate_logit_scale,
                                         dtype=dtype, rngs=rngs, formulation=formulation)
                        if gates else None)
        self.up = nnx.List(up)
        self.decoder = nnx.List(dec)
        self.gates = nnx.List(gate)
        self.head = _conv(widths[0], OUTPUT_CHANNELS[output], 1, dtype=dtype, rngs=rngs, formulation=formulation)

    def __call__(self, x):
        skips = []
        for i, blocks in enumerate(self.encoder):
            x = self.stem(x) if i == 0 else self.down[i - 1](x)
            for block in blocks:
                x = block(x)
            skips.append(x)
        attention = []
        for up, blocks, gate, skip in zip(self.up, self.decoder, self.gates, reversed(skips[:-1])):
            x = jnp.concatenate([up(x), skip], axis=-1)
            for block in blocks:
                x = block(x)
            if gate is not None:
                x, z = gate(x)
                attention.append(z.astype(jnp.float32))
        return self.head(x).astype(jnp.float32), tuple(attention)


def forward(graphdef, params, x, *, output: str):
    """The network as a window function for inference: x (N, D, H, W, in_channels) -> (probabilities,
    maps). probabilities (N, D, H, W, 3) float32 ET/TC/WT; with a softmax head ("labels") a
    region's probability is the sum of its labels'. maps: per decoder stage, coarsest first, the
    (N, d, h, w, num_maps) float32 attention maps in [0, 1] (empty without gates)."""
    logits, attention = nnx.merge(graphdef, params)(x)
    if output == "regions":
        probabilities = jax.nn.sigmoid(logits)
    else:
        p = jax.nn.softmax(logits, axis=-1)
        probabilities = jnp.stack([p[..., 3], p[..., 1] + p[..., 3], 1 - p[..., 0]], axis=-1)
    return probabilities, tuple(jax.nn.sigmoid(a) for a in attention)


def build_model(model_cfg, rngs: nnx.Rngs, formulation: Formulation | None = None) -> SegGuidedNet:
    """Builds the network from the config's `model` block, its parameters drawn from `rngs` with the
    package's random-bits algorithm (runtime.original_threefry), in the formulation its keys give
    (Formulation.from_config) unless one is given."""
    with original_threefry():
        return SegGuidedNet(
            in_channels=model_cfg.in_channels, widths=tuple(model_cfg.widths),
            encoder_blocks=tuple(model_cfg.encoder_blocks), decoder_blocks=tuple(model_cfg.decoder_blocks),
            down_kernel=model_cfg.down_kernel, upsample=model_cfg.upsample, gates=model_cfg.gates,
            num_maps=model_cfg.num_maps, output=model_cfg.output, leaky_slope=model_cfg.leaky_slope,
            gate_stop_gradient=model_cfg.gate_stop_gradient, gate_logit_scale=model_cfg.gate_logit_scale,
            dtype=jnp.dtype(model_cfg.compute_dtype), rngs=rngs,
            formulation=formulation or Formulation.from_config(model_cfg))


def abstract_model(model_cfg, formulation: Formulation | None = None) -> SegGuidedNet:
    """The model with ShapeDtypeStructs for arrays: shapes without allocating."""
    return nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0), formulation))


def parameter_count(model: nnx.Module) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def gate_parameter_count(model: SegGuidedNet) -> int:
    return sum(parameter_count(g) for g in model.gates if g is not None)
