"""Evaluate predicted BraTS label maps against references, per case and in summary.

    python -m segguided_jax.evaluate --pred DIR --ref DIR --out DIR [--edition auto|2021|2023]
        [--hd95-method brats|medpy] [--empty-hd95 brats|brats2021|diagonal] [--lesion-dilation 3]
        [--lesion-min-volume 50]

Inputs
  --pred  flat files: ``<pred>/<case_id>.nii.gz`` (or ``.nii``, as nnU-Net writes for a dataset
          whose file_ending is .nii; a label map in the edition's label values:
          2021 ET = 4, 2023 ET = 3), and optionally attention maps
          ``<pred>/<case_id>_attention_{NCR,ED,ET}.nii.gz`` (float in [0, 1]).
  --ref   BraTS case folders ``<ref>/<case_id>/<case_id>_seg.nii.gz`` (2021) or
          ``<ref>/<case_id>/<case_id>-seg.nii.gz`` (2023), or flat ``<ref>/<case_id>.nii.gz``, or an
          nnU-Net v2 dataset (its labelsTr/ and labelsTs/) or one of those folders.
  The edition (file names and label values) is told from the case id (BraTS2021_XXXXX,
  BraTS-GLI-XXXXX-YYY) unless --edition names it; an nnU-Net dataset's label values come from its
  dataset.json (predictions in the same values: predict --output-format nnunet, or nnU-Net's
  own). HD95 uses the reference header's voxel spacing.
  Either folder may be a gs:// URI (each file is then read whole into memory).

Metrics (definitions and sources in segguided_jax/evaluation/metrics.py): per region ET, TC, WT the classic
Dice, HD95 (mm), sensitivity and specificity; the BraTS 2023 lesion-wise Dice and HD95 (GLI
parameters by default) with lesion TP/FN/FP counts; and, for cases with attention maps, per
sub-region NCR, ED, ET the soft Dice of the map against the reference sub-region mask and the
fraction of the map's mass inside it. The defaults give the values of the official BraTS 2023
evaluation code (its Legacy_Dice, Legacy_HD95, Sensitivity, Specificity, LesionWise scores and
Num_TP/FP/FN): HD95 as DeepMind's ``surface_distance`` computes it, 374 mm when exactly one mask is
empty. --hd95-method medpy gives MedPy's HD95 instead. --empty-hd95 brats2021 gives the classic
HD95 the BraTS 2021 penalty, 373.13 mm (lesion-wise stays 374, as only the 2023 code defines it);
--empty-hd95 diagonal uses the case volume's diagonal in mm for both.

Bad input: a case whose files cannot be read (missing, truncated, not NIfTI), whose prediction has
another shape than its reference, label values outside the edition's, or non-integer labels, and
a reference case without its segmentation (a case folder without the seg file, an nnU-Net case
with images but no label file) is reported on stderr and in per_case.csv (status ``error`` and
the message, which names the file); the other cases are scored. Exit status: 0 every paired case
scored, 1 some case could not be scored, 2 a usage error (a folder missing or holding nothing to
evaluate). Cases found in only one folder are warned about and listed, but do not change the exit
status.

Outputs in --out, a local folder or gs:// URI (each written whole or not at all)
  per_case.csv   one row per case found in either folder (schema: ``write_per_case``); ``status``
                 is ok, error, missing_prediction or missing_reference (only ok rows have metrics
                 and enter the summary).
  summary.csv    per metric over the scored cases: n, mean, std (sample, ddof=1; 0 for one
                 case), median, q25, q75 (numpy linear percentiles), min, max. NaN values (an
                 attention map with no mass) are left out and n says how many were used.
  metrics.json   settings, definitions, summary, per-case rows, the cases that could not be scored
                 with their messages, and the missing case lists (NaN written as null).
  boxplot_<metric>.png  one box plot per metric, one box per region (or sub-region).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys

import numpy as np

from segguided_jax.evaluation import metrics
from segguided_jax.io import storage
from segguided_jax.data import nnunet
from segguided_jax.data.brats import EDITIONS, REGIONS, SUBREGIONS, Edition, detect_edition
from segguided_jax.data.cases import NII, parse_prediction_file
from segguided_jax.evaluation.stats import mean_std

# (metric family, what it is, unit); the per-case columns are f"{family}_{region}".
REGION_FAMILIES = (
    ("dice", "Dice (classic; both empty 1, one empty 0)", ""),
    ("hd95", "HD95: {hd95} (both empty 0, one empty the penalty)", "mm"),
    ("sensitivity", "sensitivity TP/(TP+FN)", ""),
    ("specificity", "specificity TN/(TN+FP)", ""),
    ("lesion_dice", "lesion-wise Dice (BraTS 2023)", ""),
    ("lesion_hd95", "lesion-wise HD95 (BraTS 2023; per lesion {hd95})", "mm"),
    ("lesion_tp", "lesion-wise true-positive reference lesions", "lesions"),
    ("lesion_fn", "lesion-wise missed reference lesions", "lesions"),
    ("lesion_fp", "lesion-wise unmatched predicted components", "lesions"),
)
ATTENTION_FAMILIES = (
    ("attention_soft_dice", "soft Dice of the attention map vs the reference sub-region mask", ""),
    ("attention_mass_inside", "fraction of the attention map's mass inside the reference sub-region", ""),
    ("attention_soft_dice_other", "largest soft Dice of the attention map with another reference sub-region", ""),
)
HD95_DEFINITIONS = {
    "brats": "the larger of the two directed area-weighted 95th percentiles of surface-element distances "
             "(official BraTS 2023 code)",
    "medpy": "95th percentile of both directions' surface-voxel distances pooled (MedPy)",
}
EMPTY_HD95_CHOICES = ("brats", "brats2021", "diagonal")
STATUSES = ("ok", "error", "missing_prediction", "missing_reference")
# Context columns of the per-case CSV, after the metrics (see write_per_case).
INFO_COLUMNS = ("edition", "spacing", "hd95_penalty", "lesion_hd95_penalty", "pred_file", "ref_file")
SUMMARY_STATS = ("n", "mean", "std", "median", "q25", "q75", "min", "max")
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


def find_references(ref_dir: str, edition: str = "auto") -> tuple[dict, dict]:
    """({case_id: (seg file path, Edition)} for the case folders and flat files in ref_dir, or the
    label files of an nnU-Net dataset; {case_id: message} for the cases without a segmentation)."""
    if nnunet.dataset_root_of(ref_dir) is not None:
        try:
            return nnunet.references(ref_dir)
        except nnunet.DatasetError as e:
            raise ValueError(str(e)) from e
    refs, unlabelled = {}, {}
    for name in storage.listdir(ref_dir):
        path = storage.join(ref_dir, name)
        if name.startswith("."):
            continue
        if storage.isdir(path):
            case_id = name
            ed = _edition_for(case_id, edition)
            seg = ed.seg_file(path)
            if not storage.isfile(seg):
                unlabelled[case_id] = f"case {case_id}: reference case folder {path} has no segmentation {seg}"
                continue
        elif name.endswith(NII):
            case_id, seg = _case_id_of(name), path
            ed = _edition_for(case_id, edition)
        else:
            continue
        if case_id in refs:
            raise ValueError(f"case {case_id} has two references: {refs[case_id][0]} and {seg}")
        refs[case_id] = (seg, ed)
    return refs, unlabelled


def find_predictions(pred_dir: str) -> dict:
    """{case_id: {"seg": path or None, "attention": {sub-region: path}}} for the flat files in
    pred_dir, named as predict names them (attention maps without a label map give seg None)."""
    preds = {}
    for name in storage.listdir(pred_dir):
        path = storage.join(pred_dir, name)
        parsed = parse_prediction_file(name)
        if parsed is None or parsed[1] == "probabilities" or not storage.isfile(path):
            continue
        case_id, kind = parsed
        entry = preds.setdefault(case_id, {"seg": None, "attention": {}})
        if kind == "labels":
            entry["seg"] = path
        else:
            entry["attention"][kind] = path
    return preds


class CaseFileError(Exception):
    """A file of a case that cannot be read as a NIfTI volume; the message names the file."""


def _read_volume(path: str, what: str) -> tuple:
    """(3-D array as stored, NIfTI image) of `path`. Whatever goes wrong while reading (a missing,
    truncated or garbled file) is raised as CaseFileError naming the file and what it is."""
    try:
        img = storage.read_nifti(path)[0]
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file's name
        raise CaseFileError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from e
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, img


def read_labels(path: str, edition: Edition) -> tuple:
    """A label map in the edition's values -> (internal labels uint8 (X, Y, Z), the NIfTI image)."""
    data, img = _read_volume(path, "label map")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: label map has non-integer values")
    values = np.unique(data).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(edition.labels))
    if bad:
        name = f"BraTS{edition.name}" if edition.name in EDITIONS else edition.name
        raise ValueError(f"{path}: label values {bad} are not {name} labels {list(edition.labels)} "
                         f"(predictions must use the references' edition; see --edition)")
    return edition.to_internal(data.astype(np.int64)), img


def read_attention(path: str, shape: tuple) -> np.ndarray:
    """An attention map (X, Y, Z) with values in [0, 1] -> float64 array of `shape`."""
    data, _ = _read_volume(path, "attention map")
    data = data.astype(np.float64)
    if data.shape != shape:
        raise ValueError(f"{path}: attention map shape {data.shape} != reference shape {shape}")
    if not np.all(np.isfinite(data)) or data.min() < -1e-6 or data.max() > 1 + 1e-6:
        raise ValueError(f"{path}: attention map values must lie in [0, 1] "
                         f"(got [{np.nanmin(data):.4g}, {np.nanmax(data):.4g}])")
    return np.clip(data, 0.0, 1.0)


def hd95_penalties(empty_hd95: str, shape: tuple, spacing: tuple) -> tuple[float, float]:
    """(classic, lesion-wise) HD95 when exactly one mask is empty, for an --empty-hd95 choice:
    brats = 374 and 374 (the official BraTS 2023 code), brats2021 = 373.13 (BraTS 2021's classic
    HD95) and 374 (lesion-wise HD95 exists only in the 2023 code), diagonal = the case volume's
    diagonal in mm for both."""
    if empty_hd95 == "brats":
        return metrics.HD95_EMPTY, metrics.HD95_EMPTY
    if empty_hd95 == "brats2021":
        return metrics.HD95_EMPTY_2021, metrics.HD95_EMPTY
    if empty_hd95 == "diagonal":
        diagonal = metrics.volume_diagonal(shape, spacing)
        return diagonal, diagonal
    raise ValueError(f"empty_hd95 must be one of {EMPTY_HD95_CHOICES}, got {empty_hd95!r}")


def evaluate_case(case_id: str, pred_path: str, ref_path: str, edition: Edition, attention_paths: dict,
                  empty_hd95: str = "brats", lesion_dilation: int = metrics.LESION_DILATION,
                  lesion_min_volume: float = metrics.LESION_MIN_VOLUME_MM3, warn=None,
                  hd95_method: str = "brats") -> dict:
    """Metrics of one case (a flat dict, see metrics.case_metrics) plus "spacing", "hd95_penalty" and
    "lesion_hd95_penalty". Raises CaseFileError or ValueError (naming the case or file) on bad input."""
    ref, ref_img = read_labels(ref_path, edition)
    pred, pred_img = read_labels(pred_path, edition)
    if pred.shape != ref.shape:
        raise ValueError(f"case {case_id}: prediction {pred_path} has shape {pred.shape} but reference "
                         f"{ref_path} has shape {ref.shape}")
    if warn is not None and not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
        warn(f"case {case_id}: the prediction's affine differs from the reference's "
             f"({pred_path} vs {ref_path}); metrics are computed voxel by voxel")
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    penalty, lesion_penalty = hd95_penalties(empty_hd95, ref.shape, spacing)
    attention = {sub: read_attention(path, ref.shape) for sub, path in attention_paths.items()}
    row = metrics.case_metrics(pred, ref, spacing, attention or None, penalty, lesion_dilation, lesion_min_volume,
                               hd95_method, lesion_penalty)
    row["spacing"] = "x".join(f"{s:g}" for s in spacing)
    row["hd95_penalty"] = penalty
    row["lesion_hd95_penalty"] = lesion_penalty
    return row


def metric_columns(rows: list) -> list:
    """The metric column names: every region family for ET, TC, WT, then the attention columns
    present in any row; a fixed order."""
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
        return {"n": 0, **{k: float("nan") for k in SUMMARY_STATS[1:]}}
    mean, std = mean_std(x)
    return {"n": int(x.size), "mean": mean, "std": std, "median": float(np.median(x)),
            "q25": float(np.percentile(x, 25)), "q75": float(np.percentile(x, 75)),
            "min": float(x.min()), "max": float(x.max())}


# Discovery: which cases have a prediction, a reference, or both.

@dataclasses.dataclass
class Discovery:
    refs: dict  # {case_id: (reference file, Edition)}
    preds: dict  # {case_id: {"seg": file or None, "attention": {sub-region: file}}}
    paired: list  # case ids with both, sorted
    missing_prediction: list  # case ids with a reference only, sorted
    missing_reference: list  # case ids with a prediction only, sorted
    unlabelled: dict = dataclasses.field(default_factory=dict)  # {case_id: message}: a reference without its seg


def discover(pred_dir: str, ref_dir: str, edition: str = "auto", warn=None) -> Discovery:
    """Pairs predictions with references. Raises FileNotFoundError when a folder is missing or holds
    nothing to evaluate; warns (via `warn`) about every case found on one side only."""
    warn = warn or _stderr_warning
    for name, d in (("--pred", pred_dir), ("--ref", ref_dir)):
        if not storage.isdir(d):
            raise FileNotFoundError(f"{name} {d} is not a folder")
    refs, unlabelled = find_references(ref_dir, edition)
    preds = find_predictions(pred_dir)
    if not refs and not unlabelled:
        raise FileNotFoundError(f"no references in {ref_dir} (expected <case_id>/<case_id>_seg.nii.gz, "
                                f"<case_id>/<case_id>-seg.nii.gz or <case_id>.nii.gz)")
    if not any(p["seg"] for p in preds.values()):
        raise FileNotFoundError(f"no predictions <case_id>.nii.gz in {pred_dir}")
    for case_id, p in preds.items():
        if p["seg"] is None:
            warn(f"case {case_id}: attention maps without a label map {case_id}{NII} in {pred_dir}; ignored")
    pred_ids = {c for c, p in preds.items() if p["seg"]}
    found = Discovery(refs, preds, sorted(set(refs) & pred_ids), sorted(set(refs) - pred_ids),
                      sorted(pred_ids - set(refs) - set(unlabelled)), unlabelled)
    for c in found.missing_prediction:
        warn(f"case {c}: reference {refs[c][0]} has no prediction {storage.join(pred_dir, c + NII)}")
    for c in found.missing_reference:
        warn(f"case {c}: prediction {preds[c]['seg']} has no reference in {ref_dir}")
    return found


# Scoring: one row per case; a case that cannot be scored becomes an "error" row.

def score_cases(found: Discovery, empty_hd95: str = "brats", lesion_dilation: int = metrics.LESION_DILATION,
                lesion_min_volume: float = metrics.LESION_MIN_VOLUME_MM3, hd95_method: str = "brats",
                log=print, warn=None, err=None) -> list:
    """Rows (dicts, see write_per_case) for every case in `found`, sorted by case id. A paired case
    whose files cannot be read or scored gets status "error" and the message (which names the
    file) in "error"; it is also passed to `err`, and the other cases go on."""
    warn = warn or _stderr_warning
    err = err or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = []
    for i, case_id in enumerate(found.paired):
        ref_path, ed = found.refs[case_id]
        pred = found.preds[case_id]
        row = {"case_id": case_id, "status": "ok", "edition": ed.name, "pred_file": pred["seg"], "ref_file": ref_path}
        try:
            row.update(evaluate_case(case_id, pred["seg"], ref_path, ed, pred["attention"], empty_hd95,
                                     lesion_dilation, lesion_min_volume, warn, hd95_method))
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
            message = str(e) if isinstance(e, (CaseFileError, ValueError)) else (
                f"case {case_id} ({pred['seg']} vs {ref_path}): {type(e).__name__}: {e}")
            row.update(status="error", error=message)
            named = message if message.startswith(f"case {case_id}") else f"case {case_id}: {message}"
            err(("\n" if sys.stdout.isatty() else "") + f"error: {named}")
        rows.append(row)
        log(f"\revaluate: {i + 1}/{len(found.paired)} cases", end="" if sys.stdout.isatty() else "\n", flush=True)
    for c, message in found.unlabelled.items():  # reported like a damaged prediction: it cannot be scored
        rows.append({"case_id": c, "status": "error", "pred_file": (found.preds.get(c) or {}).get("seg"),
                     "ref_file": None, "error": message})
        err(f"error: {message}")
    for c in found.missing_prediction:
        rows.append({"case_id": c, "status": "missing_prediction", "edition": found.refs[c][1].name,
                     "pred_file": None, "ref_file": found.refs[c][0]})
    for c in found.missing_reference:
        rows.append({"case_id": c, "status": "missing_reference", "edition": None,
                     "pred_file": found.preds[c]["seg"], "ref_file": None})
    rows.sort(key=lambda r: r["case_id"])
    return rows


# Writing: per_case.csv, summary.csv, metrics.json, box plots. Each file appears whole or not at all.

def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_csv(path: str, header: list, rows: list) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(row.get(h)) for h in header])
    storage.write_text(path, text.getvalue())


def per_case_header(rows: list) -> list:
    """The per-case CSV's columns for these rows: "case_id", "status", the metric columns
    (``metric_columns``), the context columns of INFO_COLUMNS that any row has, then "error"."""
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    return (["case_id", "status"] + metric_columns(rows) + [c for c in INFO_COLUMNS if c in present]
            + ["error"])


def write_per_case(path: str, rows: list) -> list:
    """Writes the per-case CSV at `path` (a local path or gs:// URI; atomically) and returns its header.

    The one per-case schema of the project (evaluate's per_case.csv, and anything else that scores
    cases): one row per case, columns
      case_id   the case id
      status    "ok" (scored), "error" (could not be scored; see "error"), "missing_prediction",
                "missing_reference"
      metrics   every metrics.case_metrics region column, in REGION_FAMILIES x ET, TC, WT order, always
                (empty for rows without metrics); then the attention columns any row has
      context   those of INFO_COLUMNS any row has, in that order (edition, spacing "1x1x1" in mm,
                hd95_penalty and lesion_hd95_penalty in mm, pred_file, ref_file)
      error     the message of an "error" row, else empty
    rows: dicts with "case_id" and "status" (one of STATUSES) and any of those columns. Cells: ""
    for a missing value or None, "nan" for NaN, floats as repr (round-trip exact)."""
    header = per_case_header(rows)
    for row in rows:
        unknown = set(row) - set(header)
        if "case_id" not in row or row.get("status") not in STATUSES or unknown:
            raise ValueError(f"per-case row {row.get('case_id', row)!r}: needs case_id and a status in {STATUSES}"
                             + (f"; unknown columns {sorted(unknown)}" if unknown else ""))
    _write_csv(path, header, rows)
    return header


def write_summary(path: str, summary: dict) -> None:
    """summary.csv: one row per metric (column "metric") with the SUMMARY_STATS columns."""
    _write_csv(path, ["metric", *SUMMARY_STATS], [{"metric": c, **s} for c, s in summary.items()])


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


def write_json(path: str, result: dict) -> None:
    """metrics.json: `result` with NaN written as null."""
    storage.write_text(path, json.dumps(_json_safe(result), indent=1, allow_nan=False))


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
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes(path, png.getvalue())


def write_box_plots(out_dir: str, ok_rows: list, definitions: dict) -> None:
    """boxplot_<family>.png for each PLOTTED family present: one box per region (or sub-region)."""
    columns = metric_columns(ok_rows)
    for fam, _, unit in REGION_FAMILIES + ATTENTION_FAMILIES:
        cols = [c for c in columns if c.rpartition("_")[0] == fam]
        if fam not in PLOTTED or not cols:
            continue
        data = [[v for r in ok_rows if (v := r.get(c)) is not None and not math.isnan(v)] for c in cols]
        _box_plot(storage.join(out_dir, f"boxplot_{fam}.png"), fam, definitions[fam].removesuffix(f" [{unit}]"),
                  unit, [c.rpartition("_")[2].upper() for c in cols], data)


def definitions_for(hd95_method: str = "brats") -> dict:
    """{metric family: what it is [unit]} for metrics.json, with the HD95 definition of the method."""
    hd95 = HD95_DEFINITIONS[hd95_method]
    out = {}
    for fam, desc, unit in REGION_FAMILIES + ATTENTION_FAMILIES:
        desc = desc.replace("{hd95}", hd95)
        out[fam] = desc + (f" [{unit}]" if unit else "")
    return out


def _stderr_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def evaluate(pred_dir: str, ref_dir: str, out_dir: str, edition: str = "auto", empty_hd95: str = "brats",
             lesion_dilation: int = metrics.LESION_DILATION, lesion_min_volume: float = metrics.LESION_MIN_VOLUME_MM3,
             log=print, warn=None, hd95_method: str = "brats", err=None) -> dict:
    """Evaluates every case, writes the outputs listed in the module docstring, returns the JSON dict
    (its "errors" maps each case that could not be scored to its message)."""
    if empty_hd95 not in EMPTY_HD95_CHOICES:
        raise ValueError(f"empty_hd95 must be one of {EMPTY_HD95_CHOICES}, got {empty_hd95!r}")
    if hd95_method not in metrics.HD95_METHODS:
        raise ValueError(f"hd95_method must be one of {metrics.HD95_METHODS}, got {hd95_method!r}")
    found = discover(pred_dir, ref_dir, edition, warn)
    rows = score_cases(found, empty_hd95, lesion_dilation, lesion_min_volume, hd95_method, log, warn, err)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    summary = {c: summarise([r.get(c) for r in ok_rows]) for c in metric_columns(ok_rows)}
    definitions = definitions_for(hd95_method)
    errors = {r["case_id"]: r["error"] for r in rows if r["status"] == "error"}
    result = {
        "settings": {"pred": storage.abspath(pred_dir), "ref": storage.abspath(ref_dir), "edition": edition,
                     "hd95_method": hd95_method, "empty_hd95": empty_hd95,
                     "lesion_dilation": lesion_dilation, "lesion_min_volume_mm3": lesion_min_volume},
        "definitions": definitions,
        "num_evaluated": len(ok_rows),
        "num_errors": len(errors),
        "errors": errors,
        "missing_prediction": found.missing_prediction,
        "missing_reference": found.missing_reference,
        "summary": summary,
        "cases": rows,
    }
    storage.makedirs(out_dir)
    write_per_case(storage.join(out_dir, "per_case.csv"), rows)
    write_summary(storage.join(out_dir, "summary.csv"), summary)
    write_json(storage.join(out_dir, "metrics.json"), result)
    write_box_plots(out_dir, ok_rows, definitions)

    log(f"\nevaluated {len(ok_rows)} cases; {len(errors)} could not be scored; {len(found.missing_prediction)} "
        f"without prediction, {len(found.missing_reference)} without reference")
    for fam in ("dice", "hd95", "lesion_dice", "lesion_hd95"):
        cells = [f"{r} {summary[f'{fam}_{r.lower()}']['mean']:.4g} ± {summary[f'{fam}_{r.lower()}']['std']:.3g}"
                 for r in REGIONS]
        log(f"  {fam:<12} " + "   ".join(cells))
    log(f"wrote per_case.csv, summary.csv, metrics.json and box plots to {out_dir}")
    return result


def main(argv=None) -> int:
    """Runs the CLI; returns the exit status: 0 every paired case scored, 1 a case could not be
    scored (listed on stderr and in per_case.csv), 2 a usage error (no such folder, nothing to pair)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz predictions (local or gs://)")
    parser.add_argument("--ref", required=True,
                        help="folder of BraTS case folders or <case_id>.nii.gz references (local or gs://)")
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument("--edition", choices=["auto"] + sorted(EDITIONS), default="auto",
                        help="BraTS edition of file names and label values; auto: from each case id")
    parser.add_argument("--hd95-method", choices=metrics.HD95_METHODS, default="brats",
                        help="HD95 definition (classic and lesion-wise): brats = the official BraTS 2023 code's "
                             "(area-weighted surface elements, larger directed 95th percentile); medpy = MedPy's "
                             "(surface voxels, both directions pooled)")
    parser.add_argument("--empty-hd95", choices=EMPTY_HD95_CHOICES, default="brats",
                        help="HD95 when exactly one mask is empty: brats = 374 mm for classic and lesion-wise "
                             "(the BraTS 2023 code); brats2021 = 373.13 mm for classic HD95 (BraTS 2021), "
                             "374 lesion-wise; diagonal = the case volume's diagonal in mm for both")
    parser.add_argument("--lesion-dilation", type=int, default=metrics.LESION_DILATION,
                        help="lesion-wise: dilation iterations for merging and matching (BraTS-GLI: 3)")
    parser.add_argument("--lesion-min-volume", type=float, default=metrics.LESION_MIN_VOLUME_MM3,
                        help="lesion-wise: reference lesions of at most this volume in mm^3 are ignored (GLI: 50)")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.pred, args.ref, args.out, args.edition, args.empty_hd95, args.lesion_dilation,
                          args.lesion_min_volume, hd95_method=args.hd95_method)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for case_id, message in result["errors"].items():
        print(f"  failed {case_id}: {message}", file=sys.stderr)
    return 1 if result["errors"] else 0

