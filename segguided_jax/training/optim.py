"""The optimiser: AdamW with SGDR (cosine annealing with warm restarts), built from the config."""
from __future__ import annotations

import jax
import optax


def sgdr_cycles(total_steps: int, first_cycle: int, cycle_mult: float, warmup: int):
    """Cycle lengths covering total_steps: first_cycle, then each cycle_mult times the last."""
    cycles, length, covered = [], float(first_cycle), 0
    while covered < total_steps:
        n = max(int(round(length)), warmup + 1)
        cycles.append(n)
        covered += n
        length *= cycle_mult
    return cycles


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """SGDR: every cycle warms up linearly to the peak and anneals by cosine to peak · min_lr_ratio."""
    peak = optim_cfg.learning_rate
    cycles = sgdr_cycles(total_steps, optim_cfg.sgdr_first_cycle_steps or total_steps,
                         optim_cfg.sgdr_cycle_mult, optim_cfg.warmup_steps)
    return optax.sgdr_schedule([
        dict(init_value=peak * optim_cfg.min_lr_ratio, peak_value=peak, decay_steps=n,
             warmup_steps=optim_cfg.warmup_steps, end_value=peak * optim_cfg.min_lr_ratio)
        for n in cycles])


def decay_mask(params):
    """True for the parameters weight decay applies to: convolution kernels (ndim > 1), not biases
    or norm scales, which decay would only pull towards 0 (nnU-Net's and most AdamW recipes)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the SGDR schedule. optim_cfg.decay: "kernels" (default)
    decays only the convolution kernels, "all" every parameter."""
    decay = optim_cfg.get("decay", "kernels")
    if decay not in ("kernels", "all"):
        raise ValueError(f"optim.decay must be 'kernels' or 'all', got {decay!r}")
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip_norm),
        optax.adamw(learning_rate_schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                    weight_decay=optim_cfg.weight_decay, mask=decay_mask if decay == "kernels" else None),
    )
