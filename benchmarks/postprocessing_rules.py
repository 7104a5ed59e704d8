"""How each rule for choosing the minimum component volumes generalises from the val cases to the
test cases, on trained runs: the figures behind `eval.postprocess_rule` and
`eval.postprocess_floor_mm3` (docs/postprocessing.md).

    python benchmarks/postprocessing_rules.py --workdir RUN [RUN ...] [--json OUT.json]

Per run (a training workdir; its newest checkpoint and stored config): the val cases are predicted
as training's final validation predicts them (the config's eval settings) and scored per candidate
volume (postprocess.fit_scores); each rule chooses from those scores (postprocess.choose); the test
cases are predicted once as predict and sweeps do (8 mirrorings) and scored under each rule's
choice, classic and lesion-wise Dice per region, on the preprocessed grid. "oracle" is the best
single candidate per region on the test cases themselves (the headroom, not a rule).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, rule, floor mm³)
VARIANTS = (("none", None, 0.0), ("smallest", "smallest", 0.0), ("smallest+floor", "smallest", 50.0),
            ("largest", "largest", 0.0), ("middle", "plateau_middle", 0.0),
            ("middle+floor", "plateau_middle", 50.0))


def evaluate(workdir: str) -> dict:
    from segguided_jax.inference import postprocess
    from segguided_jax.data.brats import REGIONS, labels_to_regions
    from segguided_jax.data.records import CaseSource
    from segguided_jax.inference.trained_model import TrainedModel
    from segguided_jax.evaluation.metrics import dice, lesion_wise

    model = TrainedModel.from_checkpoint(workdir)
    config = model.config
    base = postprocess.PostProcessing.from_config(config.eval)
    candidates = tuple(config.eval.get("postprocess_candidates_mm3", postprocess.CANDIDATES_MM3))

    def cases(part, mirror_axes):
        source = CaseSource(config.data.dir, part, config.data.split)
        predictor = model.predictor(model.predictor_settings(mirror_axes=mirror_axes))
        target = source.manifest.get("target_spacing")
        for i, meta in enumerate(source.cases):
            case = source[i]
            yield meta["id"], predictor(case["image"]), case["label"], target or meta["spacing"]

    fit, num_val = 0.0, 0
    for _, out, label, spacing in cases("val", tuple(config.eval.get("mirror_axes", ()))):
        fit = fit + postprocess.fit_scores(out, label, spacing, base, candidates)
        num_val += 1
    chosen = {name: ({r: 0.0 for r in REGIONS} if rule is None else
                     postprocess.choose(fit, num_val, candidates, rule, floor)["min_volume_mm3"])
              for name, rule, floor in VARIANTS}
    scores = {name: {f"{k}_{r.lower()}": [] for k in ("dice", "lesion_dice") for r in REGIONS} for name in chosen}
    oracle = np.zeros((len(REGIONS), len(candidates)))
    test_ids = []
    for case_id, out, label, spacing in cases("test", (0, 1, 2)):
        test_ids.append(case_id)
        ref = labels_to_regions(label)
        for name, sizes in chosen.items():
            pred = labels_to_regions(postprocess.PostProcessing(
                base.threshold, base.et_rule, base.min_et_voxels, sizes).labels(out, spacing))
            for i, r in enumerate(REGIONS):
                scores[name][f"dice_{r.lower()}"].append(dice(pred[..., i], ref[..., i]))
                scores[name][f"lesion_dice_{r.lower()}"].append(lesion_wise(pred[..., i], ref[..., i], spacing)["dice"])
        oracle += postprocess.fit_scores(out, label, spacing, base, candidates)
    oracle_pick = {r: float(candidates[int(np.argmax(oracle[i]))]) for i, r in enumerate(REGIONS)}
    return {"workdir": workdir, "val_cases": num_val, "test_cases": test_ids, "chosen": chosen,
            "per_case": scores, "mean": {name: {k: float(np.mean(v)) for k, v in s.items()} for name, s in scores.items()},
            "oracle": {"min_volume_mm3": oracle_pick,
                       "lesion_dice": {r: float(oracle[i].max() / len(test_ids)) for i, r in enumerate(REGIONS)}}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", nargs="+", required=True)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    results = []
    for workdir in args.workdir:
        res = evaluate(workdir)
        results.append(res)
        print(f"\n{workdir}: {res['val_cases']} val cases, {len(res['test_cases'])} test cases")
        print(f"  {'rule':<15}{'WT / TC / ET mm³':<22}{'Dice ET    TC    WT':<22}{'lesion Dice ET    TC    WT'}")
        for name, sizes in res["chosen"].items():
            m = res["mean"][name]
            print(f"  {name:<15}{'/'.join(f'{sizes[r]:g}' for r in ('WT', 'TC', 'ET')):<22}"
                  + " ".join(f"{m[f'dice_{r}']:.3f}" for r in ("et", "tc", "wt")).ljust(22)
                  + "   ".join(f"{m[f'lesion_dice_{r}']:.3f}" for r in ("et", "tc", "wt")))
        o = res["oracle"]
        print(f"  {'oracle':<15}{'/'.join(f'{o['min_volume_mm3'][r]:g}' for r in ('WT', 'TC', 'ET')):<22}{'':<22}"
              + "   ".join(f"{o['lesion_dice'][r]:.3f}" for r in ("ET", "TC", "WT")))
    if len(results) > 1:
        print(f"\nmean over {len(results)} runs (lesion Dice − classic Dice per region in brackets):")
        for name, _, _ in VARIANTS:
            m = {k: np.mean([r["mean"][name][k] for r in results]) for k in results[0]["mean"][name]}
            print(f"  {name:<15}" + "  ".join(f"{r.upper()} {m[f'dice_{r}']:.3f}/{m[f'lesion_dice_{r}']:.3f} "
                                              f"({m[f'lesion_dice_{r}'] - m[f'dice_{r}']:+.3f})" for r in ("et", "tc", "wt")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
