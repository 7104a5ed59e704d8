"""Seed sweeps and ablations: expand a config's sweep into runs, evaluate each run on the
test cases, and aggregate the runs into a report with the statistics the paper lacked.

A config file defines a sweep with `get_sweep()`:
    {"seeds": [0, 1, 2],
     "settings": {"gate_aux": {}, "no_gate": {"model.gates": False, "loss.aux_weight": 0.0}},
     "compare": ["gate_aux", "no_gate"], "repeats": 1}
Each (setting, seed) is one run in ROOT/<setting>-seed<seed>; every run sees the same data and
test cases. ROOT may be a local folder or a gs:// URI (segguided_jax.io.storage). The launcher is
launch/sweep.py.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json

import numpy as np

from segguided_jax.io import runlog, storage
from segguided_jax.data import brats
from segguided_jax.evaluation.stats import bootstrap_ci, mean_std, paired_wilcoxon

EVAL_DIR = "heldout"  # inside a run's workdir: per_case.csv of the final model on the test cases
REGIONS = tuple(r.lower() for r in brats.REGIONS)  # as metrics.case_metrics names its columns
SUBREGIONS = tuple(s.lower() for s in brats.SUBREGIONS)


@dataclasses.dataclass(frozen=True)
class Run:
    setting: str
    seed: int
    overrides: tuple  # ((config key, value), ...)
    repeat: int = 0  # > 0: the same setting and seed again, for the reproducibility check

    @property
    def name(self) -> str:
        return f"{self.setting}-seed{self.seed}" + (f"-repeat{self.repeat}" if self.repeat else "")

    def train_args(self) -> list[str]:
        return [f"--config.seed={self.seed}"] + [f"--config.{k}={v}" for k, v in self.overrides]


def expand(sweep: dict) -> list[Run]:
    """One run per setting, seed and repeat (sweep["repeats"], default 1)."""
    return [Run(setting, int(seed), tuple(sorted(overrides.items())), k)
            for setting, overrides in sweep["settings"].items() for seed in sweep["seeds"]
            for k in range(sweep.get("repeats", 1))]


def is_finished(root: str, run: Run) -> bool:
    return storage.exists(storage.join(root, run.name, EVAL_DIR, "per_case.csv"))


def evaluate_run(workdir: str, out_dir: str | None = None, model: str | None = None) -> str:
    """Classic, lesion-wise and attention metrics of a run's final model on every test case of its
    split (never used in training), with the inference predict uses by default (8 mirrorings, the
    post-processing learned on the val cases), on the preprocessed grid with the case's voxel size.
    model: an exported model file (segguided_jax.export) to evaluate instead of the workdir's
    newest checkpoint, with its own config, parameters and learned post-processing.
    Writes WORKDIR/heldout/per_case.csv (evaluate's schema) and returns its path."""
    from segguided_jax.data.records import CaseSource
    from segguided_jax.evaluation.evaluate import write_per_case
    from segguided_jax.inference.predictor import predict_and_score
    from segguided_jax.evaluation.metrics import case_metrics
    from segguided_jax.inference.trained_model import TrainedModel

    trained = TrainedModel.from_file(model) if model is not None else TrainedModel.from_checkpoint(workdir)
    config = trained.config

    def score(meta, case, out, labels, spacing):
        attention = ({s: out[..., 3 + k] for k, s in enumerate(brats.SUBREGIONS)} if out.shape[-1] > 3 else None)
        return {"case_id": meta["id"], "status": "ok", "spacing": "x".join(f"{v:g}" for v in spacing),
                **case_metrics(labels, case["label"], spacing, attention)}

    rows = predict_and_score(trained.predictor(), trained.postprocessing(),
                             CaseSource(config.data.dir, "test", config.data.split), score)
    out_dir = out_dir or storage.join(workdir, EVAL_DIR)
    storage.makedirs(out_dir)
    path = storage.join(out_dir, "per_case.csv")
    write_per_case(path, rows)
    return path


def _read_per_case(path: str) -> dict:
    """{case_id: {metric: float}} of the scored ("ok") rows of a per-case CSV."""
    from segguided_jax.evaluation.evaluate import INFO_COLUMNS

    skip = {"case_id", "status", "error", *INFO_COLUMNS}
    rows = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
    return {r["case_id"]: {k: float(v) for k, v in r.items() if k not in skip and v not in ("", "nan")}
            for r in rows if r["status"] == "ok"}


def _val_curve(workdir: str) -> list[tuple[int, float]]:
    rows = runlog.MetricsFile(storage.join(workdir, "metrics.jsonl")).rows()
    return [(r["step"], r["dice_mean"]) for r in rows if r.get("split") == "val"]


def _pairs(compare) -> list[tuple[str, str]]:
    """A sweep's "compare": one pair of settings, or a list of pairs."""
    if not compare:
        return []
    if isinstance(compare[0], str):
        return [tuple(compare)]
    return [tuple(p) for p in compare]


def _run_row(run: Run, cases: dict) -> dict:
    """One run's means over its cases: Dice, lesion-wise Dice and HD95 per region, attention
    fidelity per sub-region (over the cases that have the sub-region)."""
    row = {"run": run.name, "setting": run.setting, "seed": run.seed, "cases": len(cases)}
    for m in [f"{k}_{g}" for k in ("dice", "lesion_dice", "hd95") for g in REGIONS]:
        row[m] = float(np.mean([c[m] for c in cases.values()]))
    row["dice_mean"] = float(np.mean([row[f"dice_{g}"] for g in REGIONS]))
    for sub in SUBREGIONS:
        vals = [c[f"attention_soft_dice_{sub}"] for c in cases.values() if f"attention_soft_dice_{sub}" in c]
        row[f"attention_soft_dice_{sub}"] = float(np.mean(vals)) if vals else None
    return row


def aggregate(root: str, runs: list[Run], out_dir: str, compare=(), sensitivity: str | None = None) -> dict:
    """Writes out_dir/report.md, runs.csv, summary.json and curves.png; returns the summary.

    Per setting and region: mean ± std over seeds of each run's mean Dice, lesion-wise Dice and
    HD95, a bootstrap 95 % CI over cases of the seed-averaged per-case values, attention fidelity;
    for each pair of settings in `compare` (a pair or a list of pairs), a paired Wilcoxon test per
    region pairing each case's seed-averaged values; with `sensitivity` (a config key the settings
    vary, e.g. "loss.aux_weight"), Dice and fidelity against its value; and which runs repeat a
    (setting, seed) and whether they agree."""
    storage.makedirs(out_dir)
    per_run = {r.name: _read_per_case(storage.join(root, r.name, EVAL_DIR, "per_case.csv")) for r in runs}
    settings = list(dict.fromkeys(r.setting for r in runs))
    run_rows = [_run_row(r, per_run[r.name]) for r in runs]

    def per_case_mean(setting, metric):  # seed-averaged value per case
        names = [r.name for r in runs if r.setting == setting]
        common = set.intersection(*(set(per_run[n]) for n in names))
        return {c: float(np.mean([per_run[n][c][metric] for n in names])) for c in sorted(common)
                if all(metric in per_run[n][c] for n in names)}

    summary = {}
    for s in settings:
        rows = [x for x in run_rows if x["setting"] == s]
        summary[s] = {"runs": len(rows)}
        for m in [f"{k}_{g}" for k in ("dice", "lesion_dice", "hd95") for g in REGIONS] + ["dice_mean"]:
            summary[s][m] = mean_std([x[m] for x in rows])
            if m != "dice_mean":
                summary[s][m + "_ci95"] = bootstrap_ci(list(per_case_mean(s, m).values()))
        for sub in SUBREGIONS:
            fid = [x[f"attention_soft_dice_{sub}"] for x in rows if x[f"attention_soft_dice_{sub}"] is not None]
            summary[s][f"attention_soft_dice_{sub}_over_seeds"] = mean_std(fid) if fid else None
            for m in (f"attention_soft_dice_{sub}", f"attention_mass_inside_{sub}"):
                vals = list(per_case_mean(s, m).values())
                summary[s][m] = float(np.mean(vals)) if vals else None
    tests = []
    for a, b in _pairs(compare):
        if a in settings and b in settings:
            for g in REGIONS:
                for k in ("dice", "hd95"):
                    res = paired_wilcoxon(per_case_mean(a, f"{k}_{g}"), per_case_mean(b, f"{k}_{g}"))
                    tests.append({"metric": f"{k}_{g}", "a": a, "b": b, **res})
    groups = {}
    for r in runs:
        groups.setdefault((r.setting, r.seed), []).append(r.name)
    repro = []
    for (s, seed), names in groups.items():
        curves = [_val_curve(storage.join(root, n)) for n in names]
        repro.append({"setting": s, "seed": seed, "runs": names,
                      "identical": all(c == curves[0] for c in curves) if len(names) > 1 else None})
    values = {}
    if sensitivity:
        values = {r.setting: dict(r.overrides).get(sensitivity) for r in runs}
    result = {"summary": summary, "tests": tests, "reproducibility": repro,
              "sensitivity": {"key": sensitivity, "values": values} if sensitivity else None}
    _write_report(out_dir, root, runs, run_rows, result, settings)
    return result


def _fmt(ms, digits=3):
    return "—" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _write_report(out_dir, root, runs, run_rows, result, settings):
    summary, tests, repro = result["summary"], result["tests"], result["reproducibility"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, list(run_rows[0]))
    w.writeheader()
    w.writerows(run_rows)
    storage.write_text(storage.join(out_dir, "runs.csv"), table.getvalue())
    storage.write_text(storage.join(out_dir, "summary.json"), json.dumps(result, indent=1))
    lines = ["# Sweep report", "", f"Runs under `{root}`: {len(runs)} "
             f"({', '.join(settings)} × seeds {sorted({r.seed for r in runs})}); metrics on the test cases, "
             "never seen in training or validation (classic BraTS 2021 Dice, BraTS 2023 lesion-wise Dice, HD95 "
             "in mm as the official BraTS 2023 code computes it; see segguided_jax/evaluation/metrics.py).", "",
             "## Mean ± std over seeds of each run's mean over cases", "",
             "| setting | runs | Dice ET | Dice TC | Dice WT | Dice mean | lesion Dice ET | lesion Dice TC | "
             "lesion Dice WT | HD95 ET | HD95 TC | HD95 WT |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in settings:
        v = summary[s]
        lines.append(f"| {s} | {v['runs']} | " + " | ".join(_fmt(v[f"dice_{g}"]) for g in REGIONS)
                     + f" | {_fmt(v['dice_mean'])} | " + " | ".join(_fmt(v[f"lesion_dice_{g}"]) for g in REGIONS)
                     + " | " + " | ".join(_fmt(v[f"hd95_{g}"], 2) for g in REGIONS) + " |")
    lines += ["", "## Attention fidelity (finest stage): soft Dice of each map with its own sub-region", "",
              "Mean ± std over seeds of each run's mean over the cases that contain the sub-region; then the "
              "seed- and case-averaged share of each map's mass inside its sub-region.", "",
              "| setting | soft Dice NCR | soft Dice ED | soft Dice ET | mass inside NCR | mass inside ED | "
              "mass inside ET |", "|---|---|---|---|---|---|---|"]
    for s in settings:
        v = summary[s]
        mass = [v[f"attention_mass_inside_{sub}"] for sub in SUBREGIONS]
        lines.append(f"| {s} | " + " | ".join(_fmt(v[f"attention_soft_dice_{sub}_over_seeds"]) for sub in SUBREGIONS)
                     + " | " + " | ".join("—" if c is None else f"{c:.3f}" for c in mass) + " |")
    if result["sensitivity"]:
        key, values = result["sensitivity"]["key"], result["sensitivity"]["values"]
        lines += ["", f"## Sensitivity to `{key}` (mean ± std over seeds)", "",
                  f"| {key} | Dice ET | Dice TC | Dice WT | Dice mean | soft Dice NCR | soft Dice ED | soft Dice ET |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in sorted(settings, key=lambda x: (values.get(x) is None, values.get(x))):
            v = summary[s]
            lines.append(f"| {values.get(s)} | " + " | ".join(_fmt(v[f"dice_{g}"]) for g in REGIONS)
                         + f" | {_fmt(v['dice_mean'])} | "
                         + " | ".join(_fmt(v[f"attention_soft_dice_{sub}_over_seeds"]) for sub in SUBREGIONS) + " |")
    lines += ["", "## Bootstrap 95 % CI over cases (seed-averaged per-case values; 10,000 resamples)", "",
              "| setting | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT |", "|---|---|---|---|---|---|---|"]
    for s in settings:
        v = summary[s]
        lines.append(f"| {s} | " + " | ".join(
            "[{:.3f}, {:.3f}]".format(*v[f"{k}_{g}_ci95"]) for k in ("dice", "hd95") for g in REGIONS) + " |")
    for a, b in dict.fromkeys((t["a"], t["b"]) for t in tests):
        pair = [t for t in tests if (t["a"], t["b"]) == (a, b)]
        lines += ["", f"## Paired Wilcoxon signed-rank tests, {a} vs {b}", "",
                  "Pairs: each test case's value averaged over seeds in each setting; n cases; two-sided.", "",
                  "| metric | n | median difference (a − b) | W | p |", "|---|---|---|---|---|"]
        for t in pair:
            lines.append(f"| {t['metric']} | {t['n']} | {t['median_diff']:.4f} | {t['statistic']:.1f} | "
                         f"{t['p_value']:.4f} |")
        lines += ["", "Cases paired: " + ", ".join(pair[0]["cases"])]
    lines += ["", "## Reproducibility", "", "| setting | seed | runs | identical validation curves |", "|---|---|---|---|"]
    for r in repro:
        same = "only one run" if r["identical"] is None else ("yes" if r["identical"] else "NO")
        lines.append(f"| {r['setting']} | {r['seed']} | {', '.join(r['runs'])} | {same} |")
    lines += ["", "![validation Dice against step](curves.png)", ""]
    storage.write_text(storage.join(out_dir, "report.md"), "\n".join(lines))
    _plot_curves(storage.join(out_dir, "curves.png"), root, runs, settings)


def _plot_curves(path, root, runs, settings):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {s: f"C{i}" for i, s in enumerate(settings)}
    for r in runs:
        curve = _val_curve(storage.join(root, r.name))
        if curve:
            steps, dice = zip(*curve)
            ax.plot(steps, dice, "o-", color=colours[r.setting], alpha=0.8, label=r.setting)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set_xlabel("step")
    ax.set_ylabel("validation mean Dice (ET, TC, WT)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes(path, png.getvalue())
