"""Predict BraTS label maps and attention maps for new cases, in the inputs' own space.

    python -m segguided_jax.predict (--workdir W | --checkpoint W/checkpoints/STEP)
        (--input PATH [PATH ...] | --t1 F --t1ce F --t2 F --flair F [--case-id ID])
        --out DIR [--edition 2021|2023] [--tta | --mirror-axes A [A ...]]
        [--attention-stages S [S ...] | --no-attention] [--probabilities] [--threshold T]
        [--min-et-voxels N] [--window X Y Z] [--overlap F] [--batch-size B]
        [--spacing X Y Z | --spacing train | --spacing none] [--no-panels]

Inputs
  --input   a BraTS case folder (BraTS2021_XXXXX with *_t1/_t1ce/_t2/_flair, or
            BraTS-GLI-XXXXX-YYY with -t1n/-t1c/-t2w/-t2f; the edition comes from the folder name,
            or from --edition), a folder of such case folders, or an MSD Task01 folder
            (imagesTr/, imagesTs/). Several paths may be given.
  --t1 --t1ce --t2 --flair   one case as four explicit files; --case-id names it (default: the
            T1 file name without its extension and modality suffix) and --edition sets the output
            label values (default: the edition the case id is named like, else 2021).
  A segmentation file in a case folder is ignored: prediction needs only the four images.

Outputs in --out, per case, each on the input's exact grid (shape, affine and header of the case's
T1 image), each written under a temporary name and renamed when whole; the label map comes last,
so a case that has one has all its outputs, even after a killed run:
  <case_id>.nii.gz                       uint8 label map in the edition's values (2021: 0, 1 NCR,
                                         2 ED, 4 ET; 2023: ET = 3)
  <case_id>_attention_{NCR,ED,ET}.nii.gz float32 attention maps in [0, 1] (zero outside the brain's
                                         crop box), unless --no-attention or the model has no gates
  <case_id>_probabilities.nii.gz         with --probabilities: float32 (X, Y, Z, 3) ET/TC/WT
  <case_id>_panel.png                    unless --no-panels: see segguided_jax.panels
These names are the ones segguided_jax.evaluate reads.

Labels: region probabilities > --threshold -> labels (nnU-Net nesting: WT without TC is ED, TC
without ET is NCR), then with --min-et-voxels N every ET connected component (26-connectivity)
smaller than N voxels becomes NCR, then back to the input grid.

Window, overlap, batch size and threshold default to the checkpoint config's `eval` block. As in
nnU-Net, inputs are resampled to the voxel size the model was trained at: the manifest's
target_spacing if the conversion resampled, else the median voxel size of its cases (the synthetic
demo trains on 2.5 mm voxels; real BraTS cases are 1 mm); inputs already at that size are not
touched. That needs the config's data.dir to be reachable; --spacing X Y Z sets it by hand,
--spacing none keeps the input's own (with a warning if it is more than 10 % off the training
voxel size).

A case that fails (unreadable or inconsistent files, anything raised while predicting it) is
reported with its id and file and the others still run. `main()` returns the exit status: 0 if
every case was predicted, 1 if any failed, 2 for a usage error (no model, no input).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep.cases import CaseError, CaseFiles, _brats_case, find_cases, load_case, preprocess
from data_prep.nifti_io import write_nifti_gz
from segguided_jax.data.brats import ALL_EDITIONS, EDITIONS, MODALITIES, SUBREGIONS, detect_edition
from segguided_jax.data.records import MANIFEST, to_original_grid
from segguided_jax.inference import probabilities_to_labels

NII = ".nii.gz"


# ---------------------------------------------------------------------------------------------
# Finding the cases

@dataclasses.dataclass(frozen=True)
class BadInput:
    """An input that could not even be turned into a case: reported like a failed case."""
    name: str
    error: str


def _has_nifti(folder: str) -> bool:
    return any(n.endswith((".nii", ".nii.gz")) for n in os.listdir(folder))


def _case_folder(path: str, edition: str | None) -> CaseFiles:
    name = os.path.basename(os.path.normpath(path))
    if edition is None:
        detected = detect_edition(name)
        if detected is None:
            raise CaseError(f"{path}: folder not named like a BraTS2021 (BraTS2021_XXXXX) or BraTS2023-GLI "
                            "(BraTS-GLI-XXXXX-YYY) case; rename it or pass --edition")
        edition = detected.name
    return _brats_case(path, edition)


def find_inputs(paths: list[str], edition: str | None = None) -> list:
    """CaseFiles (seg dropped: prediction never reads it) or BadInput for every case under `paths`.

    A path is a case folder if it holds NIfTI files, an MSD folder if it holds imagesTr/ or
    imagesTs/, else a folder of case folders. Problems become BadInput entries, so that one bad
    folder does not stop the others.
    """
    found, seen = [], {}
    for path in paths:
        if not os.path.exists(path):
            found.append(BadInput(path, f"{path}: no such file or folder"))
            continue
        if not os.path.isdir(path):
            found.append(BadInput(path, f"{path}: --input takes case folders or folders of case folders; "
                                        "give single image files with --t1 --t1ce --t2 --flair"))
            continue
        entries = []
        try:
            if any(os.path.isdir(os.path.join(path, d)) for d in ("imagesTr", "imagesTs")):
                entries = find_cases([path], "msd")[1]
            elif _has_nifti(path):
                entries = [_case_folder(path, edition)]
            else:
                subs = sorted(n for n in os.listdir(path)
                              if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))
                if not subs:
                    raise CaseError(f"{path}: no case folders and no NIfTI files in it")
                for n in subs:
                    try:
                        entries.append(_case_folder(os.path.join(path, n), edition))
                    except CaseError as e:
                        entries.append(BadInput(os.path.join(path, n), str(e)))
        except CaseError as e:
            entries = [BadInput(path, str(e))]
        for cf in entries:
            if isinstance(cf, CaseFiles):
                if cf.case_id in seen:
                    cf = BadInput(cf.case_id, f"case {cf.case_id}: duplicate case id, in {seen[cf.case_id]} and "
                                              f"{cf.images[0]}; the outputs would overwrite each other")
                else:
                    seen[cf.case_id] = cf.images[0]
                    cf = dataclasses.replace(cf, seg=None)
            found.append(cf)
    return found


def case_id_from_file(path: str) -> str:
    """The case id in a T1 file name: BraTS2021_00000_t1.nii.gz -> BraTS2021_00000,
    BraTS-GLI-00000-000-t1n.nii.gz -> BraTS-GLI-00000-000; other names lose only the extension."""
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return re.sub(r"[_-](t1|t1n)$", "", name, flags=re.IGNORECASE) or name


def explicit_case(t1: str, t1ce: str, t2: str, flair: str, case_id: str | None, edition: str | None) -> CaseFiles:
    case_id = case_id or case_id_from_file(t1)
    if edition is None:
        detected = detect_edition(case_id)
        edition = detected.name if detected else "2021"
    files = {"t1": t1, "t1ce": t1ce, "t2": t2, "flair": flair}
    return CaseFiles(case_id, edition, tuple(files[m] for m in MODALITIES), None)


# ---------------------------------------------------------------------------------------------
# Post-processing and the way back to the input grid

def to_input_grid(values: np.ndarray, meta: dict) -> np.ndarray:
    """Float maps (x, y, z[, C]) on the preprocessed grid -> float32 (X, Y, Z[, C]) on the input
    grid: zeros outside the crop box, linear interpolation back if preprocessing resampled."""
    box = tuple(slice(lo, hi) for lo, hi in meta["crop_box"])
    out = np.zeros(tuple(meta["orig_shape"]) + values.shape[3:], np.float32)
    crop_shape = out[box].shape[:3]
    if values.shape[:3] != crop_shape:
        factors = [c / s for c, s in zip(crop_shape, values.shape[:3])] + [1] * (values.ndim - 3)
        values = ndimage.zoom(values, factors, order=1, mode="nearest", grid_mode=True)
    out[box] = np.clip(values, 0.0, 1.0)
    return out


def _write(data: np.ndarray, reference: nib.Nifti1Image, path: str) -> None:
    """Writes data with the reference image's affine and header (dtype set to data's)."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    header["cal_min"], header["cal_max"] = 0, 0  # the T1's display range means nothing here
    img = nib.Nifti1Image(data, reference.affine, header)
    write_nifti_gz(img, path)


# ---------------------------------------------------------------------------------------------
# Prediction

@dataclasses.dataclass
class Settings:
    window: tuple
    overlap: float
    batch_size: int
    threshold: float
    mirror_axes: tuple
    attention_stages: tuple  # empty: no attention maps
    min_et_voxels: int
    probabilities: bool
    panels: bool
    target_spacing: list | None
    spacing_source: str = ""  # where target_spacing came from, for the log
    training_spacing: list | None = None  # voxel size the model was trained at, if known


def make_predictor(config, graphdef, params, settings: Settings):
    """image (X, Y, Z, 4) float32 -> (X, Y, Z, 3 [+ 3]) region probabilities [+ attention maps].
    One jitted function for the whole run (every window batch has the same shape), its windows
    spread over all devices."""
    import jax
    import ml_collections

    from segguided_jax import sharding
    from segguided_jax.inference import make_window_predictor, sliding_window

    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "spatial": 1}))
    n = mesh.shape[sharding.DATA_AXIS]
    batch_size = -(-settings.batch_size // n) * n  # a whole number of windows per device
    predict = make_window_predictor(graphdef, mesh, output=config.model.output, mirror_axes=settings.mirror_axes,
                                    attention_stages=settings.attention_stages)
    params = jax.device_put(params, sharding.replicated(mesh))
    return lambda image: sliding_window(lambda b: predict(params, b), image, settings.window,
                                        settings.overlap, batch_size)


def spacing_warning(case_id: str, spacing, settings: Settings) -> str | None:
    """A warning when a case is predicted at a voxel size more than 10 % off the training data's:
    the network's receptive field is in voxels, so it would see the anatomy at the wrong scale."""
    used = settings.target_spacing or spacing
    trained = settings.training_spacing
    if trained is None or all(abs(u / t - 1) <= 0.1 for u, t in zip(used, trained)):
        return None
    def fmt(v):
        return " x ".join(f"{x:g}" for x in v)

    return (f"case {case_id}: predicted at {fmt(used)} mm voxels, but the model was trained at {fmt(trained)} mm; "
            "drop --spacing to resample to the training voxel size")


def predict_case(cf: CaseFiles, predictor, settings: Settings, out_dir: str, warn=None) -> dict:
    """Predicts one case and writes its outputs; returns seconds per phase (read, infer, write)."""
    t0 = time.time()
    case = load_case(cf)
    if warn is not None and (msg := spacing_warning(cf.case_id, case.spacing, settings)):
        warn(msg)
    image, _, meta = preprocess(case, settings.target_spacing)
    meta = {"id": cf.case_id, "orig_shape": list(case.images.shape[1:]), **meta}
    t1 = time.time()
    outputs = predictor(image)
    t2 = time.time()
    probs = outputs[..., :3]
    internal = probabilities_to_labels(probs, settings.threshold, settings.min_et_voxels)
    labels = to_original_grid(internal, meta, cf.edition)

    reference = nib.load(cf.images[0])  # the header only: data stays on disk
    if cf.edition == "msd":  # one 4-D file: the outputs take its spatial part
        reference = nib.Nifti1Image(np.zeros(labels.shape, np.uint8), reference.affine, reference.header)
    stem = os.path.join(out_dir, cf.case_id)
    attention = None
    if settings.attention_stages:
        attention = to_input_grid(outputs[..., 3:6], meta)
        for k, sub in enumerate(SUBREGIONS):
            _write(np.ascontiguousarray(attention[..., k]), reference, f"{stem}_attention_{sub}{NII}")
    if settings.probabilities:
        _write(to_input_grid(probs, meta), reference, f"{stem}_probabilities{NII}")
    if settings.panels:
        from segguided_jax.panels import save_panel

        save_panel(f"{stem}_panel.png", case.images[MODALITIES.index("flair")], case.images[MODALITIES.index("t1ce")],
                   ALL_EDITIONS[cf.edition].to_internal(labels), attention, case.spacing,
                   f"{cf.case_id} (BraTS{cf.edition})" if cf.edition != "msd" else cf.case_id, affine=case.affine)
    _write(labels, reference, stem + NII)  # last: a case with a label map has all its outputs
    return {"read": t1 - t0, "infer": t2 - t1, "write": time.time() - t2}


def predict_all(cases: list, predictor, settings: Settings, out_dir: str, log=print, err=None) -> dict:
    """Predicts every case, going on past failures. Returns {"ok": [ids], "failed": {id: message},
    "seconds": {id: s}}."""
    err = err or (lambda msg: print(msg, file=sys.stderr, flush=True))
    os.makedirs(out_dir, exist_ok=True)
    result = {"ok": [], "failed": {}, "seconds": {}}
    for i, cf in enumerate(cases):
        progress = f"predict [{i + 1}/{len(cases)}]"
        if isinstance(cf, BadInput):
            result["failed"][cf.name] = cf.error
            err(f"{progress} FAILED {cf.name}: {cf.error}")
            continue
        t0 = time.time()
        try:
            phases = predict_case(cf, predictor, settings, out_dir, warn=lambda msg: err(f"warning: {msg}"))
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
            msg = str(e) if isinstance(e, CaseError) else (
                f"case {cf.case_id} ({os.path.dirname(cf.images[0]) or '.'}): {type(e).__name__}: {e}")
            result["failed"][cf.case_id] = msg
            err(f"{progress} FAILED {cf.case_id}: {msg}")
            continue
        seconds = time.time() - t0
        result["ok"].append(cf.case_id)
        result["seconds"][cf.case_id] = seconds
        log(f"{progress} {cf.case_id}: {seconds:.1f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Command line

def _training_spacing(config):
    """(manifest path or None, its target_spacing or None, the median voxel size of its cases or
    None): what the checkpoint's training data looked like, if its data.dir is reachable."""
    path = os.path.join(str(config.data.get("dir", "")), MANIFEST)
    if not os.path.exists(path):
        return None, None, None
    with open(path) as f:
        manifest = json.load(f)
    target = manifest.get("target_spacing")
    sizes = [c["spacing"] for c in manifest.get("cases", []) if c.get("spacing")]
    median = [float(v) for v in np.median(sizes, axis=0)] if sizes else None
    return path, (None if target is None else [float(v) for v in target]), median


def _target_spacing(config, flag):
    """(spacing to resample inputs to or None, where it came from, the training voxel size or None)."""
    path, target, median = _training_spacing(config)
    trained = target or median
    if flag is not None:
        words = [v.lower() for v in flag]
        if words == ["none"]:
            return None, "--spacing none", trained
        if words == ["train"]:
            if trained is None:
                raise ValueError(f"--spacing train: the training manifest {path or 'of config.data.dir'} gives no "
                                 "spacing; pass three numbers")
            return trained, f"--spacing train ({path})", trained
        if len(flag) != 3:
            raise ValueError(f"--spacing takes three numbers (mm), 'train' or 'none', got {flag}")
        return [float(v) for v in flag], "--spacing", trained
    if path is None:
        where = os.path.join(str(config.data.get("dir", "")), MANIFEST)
        return None, f"the training manifest {where} is not reachable; inputs keep their own spacing", None
    # As nnU-Net does: inputs are brought to the voxel size the model was trained at.
    return trained, path, trained


def _settings(args, config) -> Settings:
    num_stages = len(config.model.widths) - 1
    if args.no_attention:
        stages = ()
    elif not config.model.gates:
        stages = ()
        if args.attention_stages is not None:
            raise ValueError("--attention-stages: this model has no attention gates (model.gates=False)")
    else:
        stages = tuple(args.attention_stages) if args.attention_stages is not None else (-1,)
        bad = [s for s in stages if not -num_stages <= s < num_stages]
        if bad:
            raise ValueError(f"--attention-stages {bad}: the model has {num_stages} decoder stages, indices "
                             f"0..{num_stages - 1} coarsest first, or -1 for the finest")
    window = tuple(int(w) for w in (args.window or config.eval.window))
    divisor = 2 ** num_stages
    if len(window) != 3 or any(w <= 0 or w % divisor for w in window):
        raise ValueError(f"--window {window}: needs three sizes divisible by {divisor} (2 ** decoder stages)")
    overlap = config.eval.overlap if args.overlap is None else args.overlap
    if not 0 <= overlap < 1:
        raise ValueError(f"--overlap {overlap}: must be in [0, 1)")
    mirror = (0, 1, 2) if args.tta else tuple(sorted(set(args.mirror_axes or ())))
    if any(a not in (0, 1, 2) for a in mirror):
        raise ValueError(f"--mirror-axes {mirror}: spatial axes are 0, 1, 2")
    spacing, spacing_source, trained = _target_spacing(config, args.spacing)
    return Settings(window=window, overlap=float(overlap),
                    batch_size=int(args.batch_size or config.eval.batch_size),
                    threshold=float(config.eval.threshold if args.threshold is None else args.threshold),
                    mirror_axes=mirror, attention_stages=stages,
                    min_et_voxels=int(config.eval.get("min_et_voxels", 0) if args.min_et_voxels is None
                                      else args.min_et_voxels),
                    probabilities=args.probabilities, panels=args.panels, target_spacing=spacing,
                    spacing_source=spacing_source, training_spacing=trained)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segguided_jax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="training workdir: its newest checkpoint")
    model.add_argument("--checkpoint", help="one checkpoint folder, WORKDIR/checkpoints/STEP")
    p.add_argument("--input", nargs="+", metavar="PATH", help="case folders or folders of case folders")
    for m in MODALITIES:
        p.add_argument(f"--{m}", metavar="FILE", help=f"the {m} image of one case given file by file")
    p.add_argument("--case-id", help="with --t1 ...: the case id (default: from the T1 file name)")
    p.add_argument("--edition", choices=sorted(EDITIONS),
                   help="with --t1 ...: the output label values (default: from the case id, else 2021); "
                        "with --input: the file naming of case folders not named like BraTS cases")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tta", action="store_true", help="mirror over all three axes (8 passes)")
    p.add_argument("--mirror-axes", type=int, nargs="+", metavar="A", help="mirror over these axes (0 1 2)")
    p.add_argument("--attention-stages", type=int, nargs="+", metavar="S",
                   help="decoder stages whose attention maps are averaged: indices coarsest first, "
                        "-1 = finest (default)")
    p.add_argument("--no-attention", action="store_true", help="write no attention maps")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz")
    p.add_argument("--threshold", type=float, help="region probability threshold (default: config.eval)")
    p.add_argument("--min-et-voxels", type=int,
                   help="ET components smaller than this become NCR; 0: off (default: config.eval.min_et_voxels)")
    p.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"), help="default: config.eval.window")
    p.add_argument("--overlap", type=float, help="default: config.eval.overlap")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: config.eval.batch_size)")
    p.add_argument("--spacing", nargs="+", metavar="MM",
                   help="resample inputs to this voxel size: 3 numbers in mm, 'train' (the default: the "
                        "training data's voxel size, from its manifest) or 'none' (keep the input's)")
    p.add_argument("--panels", action=argparse.BooleanOptionalAction, default=True,
                   help="write <case>_panel.png (default: on)")
    return p


def main(argv=None) -> int:
    """Runs the CLI; returns the exit status (0 all ok, 1 a case failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = [getattr(args, m) for m in MODALITIES]
    if args.input and any(explicit):
        parser.error("give either --input or --t1 --t1ce --t2 --flair, not both")
    if not args.input and not all(explicit):
        parser.error("give --input, or all four of --t1 --t1ce --t2 --flair"
                     + (f" (missing: {', '.join('--' + m for m, f in zip(MODALITIES, explicit) if not f)})"
                        if any(explicit) else ""))
    if args.no_attention and args.attention_stages is not None:
        parser.error("--no-attention and --attention-stages exclude each other")
    if args.tta and args.mirror_axes:
        parser.error("--tta already mirrors over every axis; drop --mirror-axes")

    from segguided_jax.checkpointing import load_for_inference

    source = args.workdir or args.checkpoint
    try:
        config, graphdef, params = load_for_inference(source)
        settings = _settings(args, config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.input:
        cases = find_inputs(args.input, args.edition)
    else:
        cases = [explicit_case(*explicit, args.case_id, args.edition)]
    print(f"predict: {len(cases)} case(s) with {source}; window {settings.window}, overlap {settings.overlap}, "
          f"batch {settings.batch_size}, mirror axes {settings.mirror_axes or 'none'} "
          f"({2 ** len(settings.mirror_axes)} passes), attention stages {settings.attention_stages or 'none'}, "
          f"threshold {settings.threshold}, min ET voxels {settings.min_et_voxels}, target spacing "
          f"{settings.target_spacing or 'input'} ({settings.spacing_source})", flush=True)
    t0 = time.time()
    result = predict_all(cases, make_predictor(config, graphdef, params, settings), settings, args.out)
    total = time.time() - t0
    ok, failed = result["ok"], result["failed"]
    per_case = np.mean(list(result["seconds"].values())) if ok else float("nan")
    print(f"predict: {len(ok)} ok, {len(failed)} failed; {per_case:.1f} s per case "
          f"(the first includes compilation), {total:.1f} s in all; outputs in {args.out}", flush=True)
    for name, msg in failed.items():
        print(f"  failed {name}: {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
