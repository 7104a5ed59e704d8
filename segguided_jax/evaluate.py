"""Evaluate predicted BraTS label maps against references, per case and in summary.

    python -m segguided_jax.evaluate --pred DIR --ref DIR --out DIR [--edition auto|2021|2023]
        [--empty-hd95 brats|diagonal] [--lesion-dilation 3] [--lesion-min-volume 50]

Inputs
  --pred  flat files: ``<pred>/<case_id>.nii.gz`` (a label map in the edition's label values:
          2021 ET = 4, 2023 ET = 3), and optionally attention maps
          ``<pred>/<case_id>_attention_{NCR,ED,ET}.nii.gz`` (float in [0, 1]).
  --ref   BraTS case folders ``<ref>/<case_id>/<case_id>_seg.nii.gz`` (2021) or
          ``<ref>/<case_id>/<case_id>-seg.nii.gz`` (2023), or flat ``<ref>/<case_id>.nii.gz``.
  The edition (file names and label values) is told from the case id (BraTS2021_XXXXX,
  BraTS-GLI-XXXXX-YYY) unless --edition names it. Label values outside the edition's are an error,
  and so is a prediction whose shape differs from its reference. HD95 uses the reference header's
  voxel spacing.

Metrics (definitions and sources in segguided_jax/metrics.py): per region ET, TC, WT the classic
BraTS 2021 Dice, HD95 (mm), sensitivity and specificity; the BraTS 2023 lesion-wise Dice and HD95
(GLI parameters by default) with lesion TP/FN/FP counts; and, for cases with attention maps, per
sub-region NCR, ED, ET the soft Dice of the map against the reference sub-region mask and the
fraction of the map's mass inside it. An empty-vs-non-empty HD95 is 374 mm (BraTS's constant), or
with --empty-hd95 diagonal the diagonal of the case's volume in mm.

Outputs in --out
  per_case.csv   one row per case found in either folder; ``status`` is ok, missing_prediction or
                 missing_reference (such cases have no metrics and are left out of the summary).
  summary.csv    per metric over the evaluated cases: n, mean, std (sample, ddof=1; 0 for one
                 case), median, q25, q75 (numpy linear percentiles), min, max. NaN values (an
                 attention map with no mass) are left out and n says how many were used.
  metrics.json   settings, definitions, summary, per-case rows and the missing case lists
                 (NaN written as null).
  boxplot_<metric>.png  one box plot per metric, one box per region (or sub-region).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

import nibabel as nib
import numpy as np

from segguided_jax import metrics
from segguided_jax.data.brats import EDITIONS, REGIONS, SUBREGIONS, Edition, detect_edition

NII = ".nii.gz"
ATTENTION_INFIX = "_attention_"
PROBABILITIES_SUFFIX = "_probabilities"
# (metric family, what it is, unit); the per-case columns are f"{family}_{region}".
REGION_FAMILIES = (
    ("dice", "Dice (BraTS 2021; both empty 1, one empty 0)", ""),
    ("hd95", "HD95, symmetric 95th percentile of surface distances (both empty 0, one empty penalty)", "mm"),
    ("sensitivity", "sensitivity TP/(TP+FN)", ""),
    ("specificity", "specificity TN/(TN+FP)", ""),
    ("lesion_dice", "lesion-wise Dice (BraTS 2023)", ""),
    ("lesion_hd95", "lesion-wise HD95 (BraTS 2023)", "mm"),
    ("lesion_tp", "lesion-wise true-positive reference lesions", "lesions"),
    ("lesion_fn", "lesion-wise missed reference lesions", "lesions"),
    ("lesion_fp", "lesion-wise unmatched predicted components", "lesions"),
)
ATTENTION_FAMILIES = (
    ("attention_soft_dice", "soft Dice of the attention map vs the reference sub-region mask", ""),
    ("attention_mass_inside", "fraction of the attention map's mass inside the reference sub-region", ""),
)
PLOTTED = ("dice", "hd95", "sensitivity", "specificity", "lesion_dice", "lesion_hd95",
           "attention_soft_dice", "attention_mass_inside")


def _case_id_of(file_name: str) -> str:
    return file_name[: -len(NII)]


def _edition_for(case_id: str, forced: str) -> Edition:
    if forced != "auto":
        return EDITIONS[forced]
    edition = detect_edition(case_id)
    if edition is None:
        raise ValueError(f"cannot tell the BraTS edition of case {case_id!r} from its name "
                         f"(expected BraTS2021_XXXXX or BraTS-GLI-XXXXX-YYY); pass --edition 2021 or 2023")
    return edition


def find_references(ref_dir: str, edition: str = "auto") -> dict:
    """{case_id: (seg file path, Edition)} for the case folders and flat files in ref_dir."""
    refs = {}
    for name in sorted(os.listdir(ref_dir)):
        path = os.path.join(ref_dir, name)
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            case_id = name
            ed = _edition_for(case_id, edition)
            seg = ed.seg_file(path)
            if not os.path.isfile(seg):
                raise FileNotFoundError(f"reference case folder {path} has no segmentation {os.path.basename(seg)}")
        elif name.endswith(NII):
            case_id, seg = _case_id_of(name), path
            ed = _edition_for(case_id, edition)
        else:
            continue
        if case_id in refs:
            raise ValueError(f"case {case_id} has two references: {refs[case_id][0]} and {seg}")
        refs[case_id] = (seg, ed)
    return refs


def find_predictions(pred_dir: str) -> dict:
    """{case_id: {"seg": path or None, "attention": {sub-region: path}}} for the flat files in
    pred_dir (attention maps without a label map give seg None)."""
    preds = {}
    for name in sorted(os.listdir(pred_dir)):
        path = os.path.join(pred_dir, name)
        if name.startswith(".") or not name.endswith(NII) or not os.path.isfile(path):
            continue
        stem = _case_id_of(name)
        if stem.endswith(PROBABILITIES_SUFFIX):  # predict --probabilities: not a label map
            continue
        head, sep, sub = stem.rpartition(ATTENTION_INFIX)
        if sep and sub in SUBREGIONS:
            preds.setdefault(head, {"seg": None, "attention": {}})["attention"][sub] = path
        else:
            preds.setdefault(stem, {"seg": None, "attention": {}})["seg"] = path
    return preds


def _spatial(img: nib.Nifti1Image, path: str) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def read_labels(path: str, edition: Edition) -> tuple:
    """A label map in the edition's values -> (internal labels uint8 (X, Y, Z), the NIfTI image)."""
    img = nib.load(path)
    data = _spatial(img, path)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: label map has non-integer values")
    values = np.unique(data).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(edition.labels))
    if bad:
        raise ValueError(f"{path}: label values {bad} are not BraTS{edition.name} labels {list(edition.labels)} "
                         f"(predictions must use the references' edition; see --edition)")
    return edition.to_internal(data.astype(np.int64)), img


def read_attention(path: str, shape: tuple) -> np.ndarray:
    img = nib.load(path)
    data = _spatial(img, path).astype(np.float64)
    if data.shape != shape:
        raise ValueError(f"{path}: attention map shape {data.shape} != reference shape {shape}")
    if not np.all(np.isfinite(data)) or data.min() < -1e-6 or data.max() > 1 + 1e-6:
        raise ValueError(f"{path}: attention map values must lie in [0, 1] "
                         f"(got [{np.nanmin(data):.4g}, {np.nanmax(data):.4g}])")
    return np.clip(data, 0.0, 1.0)


def evaluate_case(case_id: str, pred_path: str, ref_path: str, edition: Edition, attention_paths: dict,
                  empty_hd95: str = "brats", lesion_dilation: int = metrics.LESION_DILATION,
                  lesion_min_volume: float = metrics.LESION_MIN_VOLUME_MM3, warn=None) -> dict:
    """Metrics of one case (a flat dict, see metrics.case_metrics) plus "spacing" and "hd95_penalty"."""
    ref, ref_img = read_labels(ref_path, edition)
    pred, pred_img = read_labels(pred_path, edition)
    if pred.shape != ref.shape:
        raise ValueError(f"case {case_id}: prediction {pred_path} has shape {pred.shape} but reference "
                         f"{ref_path} has shape {ref.shape}")
    if warn is not None and not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
        warn(f"case {case_id}: the prediction's affine differs from the reference's "
             f"({pred_path} vs {ref_path}); metrics are computed voxel by voxel")
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    penalty = metrics.HD95_EMPTY if empty_hd95 == "brats" else metrics.volume_diagonal(ref.shape, spacing)
    attention = {sub: read_attention(path, ref.shape) for sub, path in attention_paths.items()}
    row = metrics.case_metrics(pred, ref, spacing, attention or None, penalty, lesion_dilation, lesion_min_volume)
    row["spacing"] = "x".join(f"{s:g}" for s in spacing)
    row["hd95_penalty"] = penalty
    return row


def metric_columns(rows: list) -> list:
    """The metric column names present in any row, in a fixed order."""
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    columns = [f"{fam}_{r.lower()}" for fam, _, _ in REGION_FAMILIES for r in REGIONS]
    columns += [c for fam, _, _ in ATTENTION_FAMILIES for s in SUBREGIONS
                if (c := f"{fam}_{s.lower()}") in present]
    return columns


def summarise(values) -> dict:
    """Summary of a list of numbers (NaN and None left out): n, mean, std (ddof=1; 0 for one value),
    median, q25, q75, min, max; all NaN when nothing is left."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if x.size == 0:
        return {"n": 0, **{k: float("nan") for k in ("mean", "std", "median", "q25", "q75", "min", "max")}}
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "median": float(np.median(x)), "q25": float(np.percentile(x, 25)), "q75": float(np.percentile(x, 75)),
            "min": float(x.min()), "max": float(x.max())}


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_csv(path: str, header: list, rows: list) -> None:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else repr(v)
        return v

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([cell(row.get(h)) for h in header])


def _box_plot(path: str, family: str, description: str, unit: str, labels: list, data: list) -> None:
    # A Figure with the Agg canvas directly: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.4 * len(labels), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.boxplot([d if len(d) else [float("nan")] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), [f"{lab}\n(n={len(d)})" for lab, d in zip(labels, data)])
    ax.set_ylabel(f"{family} ({unit})" if unit else family)
    ax.set_title(description, fontsize=8, wrap=True)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def evaluate(pred_dir: str, ref_dir: str, out_dir: str, edition: str = "auto", empty_hd95: str = "brats",
             lesion_dilation: int = metrics.LESION_DILATION, lesion_min_volume: float = metrics.LESION_MIN_VOLUME_MM3,
             log=print, warn=None) -> dict:
    """Evaluates every case, writes the outputs listed in the module docstring, returns the JSON dict."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for name, d in (("--pred", pred_dir), ("--ref", ref_dir)):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{name} {d} is not a folder")
    refs = find_references(ref_dir, edition)
    preds = find_predictions(pred_dir)
    if not refs:
        raise FileNotFoundError(f"no references in {ref_dir} (expected <case_id>/<case_id>_seg.nii.gz, "
                                f"<case_id>/<case_id>-seg.nii.gz or <case_id>.nii.gz)")
    if not any(p["seg"] for p in preds.values()):
        raise FileNotFoundError(f"no predictions <case_id>.nii.gz in {pred_dir}")
    for case_id, p in preds.items():
        if p["seg"] is None:
            warn(f"case {case_id}: attention maps without a label map {case_id}{NII} in {pred_dir}; ignored")
    pred_ids = {c for c, p in preds.items() if p["seg"]}
    missing_prediction = sorted(set(refs) - pred_ids)
    missing_reference = sorted(pred_ids - set(refs))
    for c in missing_prediction:
        warn(f"case {c}: reference {refs[c][0]} has no prediction {os.path.join(pred_dir, c + NII)}")
    for c in missing_reference:
        warn(f"case {c}: prediction {preds[c]['seg']} has no reference in {ref_dir}")

    rows = []
    evaluated = sorted(set(refs) & pred_ids)
    for i, case_id in enumerate(evaluated):
        ref_path, ed = refs[case_id]
        row = {"case_id": case_id, "status": "ok", "edition": ed.name,
               "pred_file": preds[case_id]["seg"], "ref_file": ref_path}
        row.update(evaluate_case(case_id, preds[case_id]["seg"], ref_path, ed, preds[case_id]["attention"],
                                 empty_hd95, lesion_dilation, lesion_min_volume, warn))
        rows.append(row)
        log(f"\revaluate: {i + 1}/{len(evaluated)} cases", end="" if sys.stdout.isatty() else "\n", flush=True)
    for c in missing_prediction:
        rows.append({"case_id": c, "status": "missing_prediction", "edition": refs[c][1].name,
                     "pred_file": None, "ref_file": refs[c][0]})
    for c in missing_reference:
        rows.append({"case_id": c, "status": "missing_reference", "edition": None,
                     "pred_file": preds[c]["seg"], "ref_file": None})
    rows.sort(key=lambda r: r["case_id"])

    ok_rows = [r for r in rows if r["status"] == "ok"]
    columns = metric_columns(ok_rows)
    summary = {c: summarise([r.get(c) for r in ok_rows]) for c in columns}

    os.makedirs(out_dir, exist_ok=True)
    header = ["case_id", "status", "edition", "spacing", "hd95_penalty"] + columns + ["pred_file", "ref_file"]
    _write_csv(os.path.join(out_dir, "per_case.csv"), header, rows)
    stats = ["n", "mean", "std", "median", "q25", "q75", "min", "max"]
    _write_csv(os.path.join(out_dir, "summary.csv"), ["metric"] + stats,
               [{"metric": c, **summary[c]} for c in columns])
    families = REGION_FAMILIES + ATTENTION_FAMILIES
    definitions = {fam: desc + (f" [{unit}]" if unit else "") for fam, desc, unit in families}
    result = {
        "settings": {"pred": os.path.abspath(pred_dir), "ref": os.path.abspath(ref_dir), "edition": edition,
                     "empty_hd95": empty_hd95,
                     "lesion_dilation": lesion_dilation, "lesion_min_volume_mm3": lesion_min_volume},
        "definitions": definitions,
        "num_evaluated": len(ok_rows),
        "missing_prediction": missing_prediction,
        "missing_reference": missing_reference,
        "summary": summary,
        "cases": rows,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_json_safe(result), f, indent=1, allow_nan=False)
    for fam, desc, unit in families:
        if fam not in PLOTTED:
            continue
        cols = [c for c in columns if c.rpartition("_")[0] == fam]
        if not cols:
            continue
        data = [[v for r in ok_rows if (v := r.get(c)) is not None and not math.isnan(v)] for c in cols]
        _box_plot(os.path.join(out_dir, f"boxplot_{fam}.png"), fam, desc, unit,
                  [c.rpartition("_")[2].upper() for c in cols], data)

    log(f"\nevaluated {len(ok_rows)} cases; {len(missing_prediction)} without prediction, "
        f"{len(missing_reference)} without reference")
    for fam in ("dice", "hd95", "lesion_dice", "lesion_hd95"):
        cells = [f"{r} {summary[f'{fam}_{r.lower()}']['mean']:.4g} ± {summary[f'{fam}_{r.lower()}']['std']:.3g}"
                 for r in REGIONS]
        log(f"  {fam:<12} " + "   ".join(cells))
    log(f"wrote per_case.csv, summary.csv, metrics.json and box plots to {out_dir}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz predictions")
    parser.add_argument("--ref", required=True, help="folder of BraTS case folders or <case_id>.nii.gz references")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--edition", choices=["auto"] + sorted(EDITIONS), default="auto",
                        help="BraTS edition of file names and label values; auto: from each case id")
    parser.add_argument("--empty-hd95", choices=("brats", "diagonal"), default="brats",
                        help="HD95 when exactly one mask is empty (classic and lesion-wise): "
                             "brats = 374 mm, diagonal = the case volume's diagonal in mm")
    parser.add_argument("--lesion-dilation", type=int, default=metrics.LESION_DILATION,
                        help="lesion-wise: dilation iterations for merging and matching (BraTS-GLI: 3)")
    parser.add_argument("--lesion-min-volume", type=float, default=metrics.LESION_MIN_VOLUME_MM3,
                        help="lesion-wise: reference lesions of at most this volume in mm^3 are ignored (GLI: 50)")
    args = parser.parse_args(argv)
    evaluate(args.pred, args.ref, args.out, args.edition, args.empty_hd95, args.lesion_dilation,
             args.lesion_min_volume)


if __name__ == "__main__":
    main()
