"""One factor experiment on the attention maps: train the synthetic config with overrides, then
score the finest-stage maps on the held-out cases (the numbers in docs/gates.md).

    python benchmarks/gate_factors.py --data DIR --name NAME [--steps 600] [--overlap 0.25]
        [--out results.jsonl] [key=value ...]

key=value overrides the config (configs/synthetic.py), the value read as a Python literal, e.g.
model.gate_stop_gradient=False model.gate_logit_scale=1.0 loss.aux_weight=1.0. Training is
steps.train_step over the real Grain pipeline, as in train.py (same batches, bit for bit), without
checkpoints. Evaluation uses inference.window_outputs with attention_stages=(-1,) on every
held-out case, labels as predict makes them, and metrics.soft_dice / attention_mass_inside.

Prints, and appends to --out as one JSON line: held-out region Dice; per sub-region the mean soft
Dice of its map with it and the map's mass inside it (over cases containing it); the cases and
maps that miss diagonal dominance (own soft Dice < 2 x the soft Dice with another sub-region);
the mean map value per zone (rows: outside the brain, healthy brain, NCR, ED, ET; columns: the
NCR, ED, ET maps); and the gradient norm that the segmentation loss and λ·auxiliary loss each put
on the finest gate's map conv at three steps.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import synthetic
from segguided_jax.data.brats import SUBREGIONS, labels_to_regions
from segguided_jax.data.pipeline import train_dataset
from segguided_jax.data.records import CaseSource
from segguided_jax.inference.predictor import probabilities_to_labels, sliding_window, window_outputs
from segguided_jax.training.losses import total_loss
from segguided_jax.evaluation.metrics import attention_mass_inside, region_dice, soft_dice
from segguided_jax.training.optim import make_optimizer
from segguided_jax.training.steps import init_state, train_step


def _override(config, assignment: str):
    key, value = assignment.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[leaf] = ast.literal_eval(value)


def _map_grad_norms(config, graphdef, params, batch):
    """Norms of the gradients that the segmentation loss and λ·aux put on the finest map conv."""
    def parts(p):
        logits, attention = nnx.merge(graphdef, p)(batch["image"])
        return total_loss(logits, attention, batch["label"].astype(jnp.int32), config.loss, config.model.output)[1]

    out = {}
    for key, scale in (("seg", 1.0), ("aux", config.loss.aux_weight)):
        g = jax.grad(lambda p: scale * parts(p)[f"loss_{key}"])(params)
        leaves = jax.tree.leaves(g["gates"][len(config.model.widths) - 2]["to_maps"])
        out[key] = jnp.sqrt(sum(jnp.sum(x ** 2) for x in leaves))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="converted synthetic set (data_prep.convert output)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap for the evaluation")
    parser.add_argument("--out", default="gate_factors.jsonl")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    config = synthetic.get_config()
    config.data.dir, config.train.steps, config.eval.overlap = args.data, args.steps, args.overlap
    for assignment in args.overrides:
        _override(config, assignment)
    gates = config.model.gates
    tx = make_optimizer(config.optim, args.steps)
    state = jax.jit(functools.partial(init_state, config.seed, config.model, tx))()
    step_fn = jax.jit(functools.partial(train_step, loss_cfg=config.loss, output=config.model.output),
                      donate_argnums=0)
    grad_norms = jax.jit(functools.partial(_map_grad_norms, config, state.graphdef))
    data = iter(train_dataset(config.data.dir, config.data, seed=config.seed, batch_size=config.train.batch_size))
    t0, grad_log = time.time(), []
    for step in range(1, args.steps + 1):
        batch = {k: jnp.asarray(v) for k, v in next(data).items()}
        if gates and config.loss.aux_weight > 0 and step in (10, args.steps // 2, args.steps):
            g = {k: float(v) for k, v in grad_norms(state.params, batch).items()}
            grad_log.append({"step": step, "map_grad_seg": g["seg"], "map_grad_aux": g["aux"]})
        state, metrics = step_fn(state, batch)
        if step % 50 == 0 or step == args.steps:
            print(step, {k: round(float(v), 4) for k, v in metrics.items()}, f"{time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    predict = jax.jit(functools.partial(window_outputs, state.graphdef, output=config.model.output,
                                        attention_stages=(-1,) if gates else ()))
    source = CaseSource(config.data.dir, "val", config.data.split)
    cases = []
    for i in range(len(source)):
        case = source[i]
        out = sliding_window(lambda x: np.asarray(predict(state.params, x)), case["image"], config.eval.window,
                             config.eval.overlap, config.eval.batch_size)
        labels = probabilities_to_labels(out[..., :3], config.eval.threshold, config.eval.min_et_voxels)
        ref = case["label"]
        row = {"case": source.cases[i]["id"], **region_dice(labels_to_regions(labels), labels_to_regions(ref)),
               "present": [bool((ref == s + 1).any()) for s in range(3)]}
        if gates:
            maps = out[..., 3:6]
            row["matrix"] = [[soft_dice(maps[..., m], ref == s + 1) for s in range(3)] for m in range(3)]
            row["mass"] = [attention_mass_inside(maps[..., m], ref == m + 1) for m in range(3)]
            brain = np.any(case["image"] != 0, axis=-1)
            zones = [~brain, brain & (ref == 0)] + [ref == k for k in (1, 2, 3)]
            row["zone_means"] = [[float(maps[..., m][z].mean()) if z.any() else float("nan") for m in range(3)]
                                 for z in zones]
        cases.append(row)

    summary = {k: float(np.mean([r[k] for r in cases])) for k in ("dice_et", "dice_tc", "dice_wt")}
    summary["dice_mean"] = float(np.mean(list(summary.values())))
    if gates:
        failures = []
        for m, sub in enumerate(SUBREGIONS):
            rows = [r for r in cases if r["present"][m]]
            summary[f"attn_dice_{sub.lower()}"] = float(np.mean([r["matrix"][m][m] for r in rows]))
            summary[f"attn_mass_{sub.lower()}"] = float(np.nanmean([r["mass"][m] for r in rows]))
            failures += [f"{r['case']}:{sub}" for r in rows
                         if r["matrix"][m][m] < 2 * max(r["matrix"][m][t] for t in range(3) if t != m)]
        summary["dominance_failures"] = failures
        summary["zone_means"] = np.round(np.nanmean([r["zone_means"] for r in cases], 0), 3).tolist()
    result = {"name": args.name, "steps": args.steps, "overrides": args.overrides, "train_s": round(train_s),
              "summary": summary, "map_grad_norms": grad_log, "cases": cases}
    print(json.dumps({k: result[k] for k in ("name", "summary", "map_grad_norms", "train_s")}))
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
