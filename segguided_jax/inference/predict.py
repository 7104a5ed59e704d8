"""Predict BraTS label maps and attention maps for new cases, in the inputs' own space.

    python -m segguided_jax.predict (--workdir W | --checkpoint W/checkpoints/STEP | --model MODEL.sgm)
        (--input PATH [PATH ...] | --t1 F --t1ce F --t2 F --flair F [--case-id ID])
        --out DIR [--edition 2021|2023] [--output-format nnunet|brats] [--channels M M M M]
        [--no-tta | --mirror-axes A [A ...]]
        [--attention-stages S [S ...] | --no-attention] [--probabilities] [--threshold T]
        [--postprocessing learned|none|FILE] [--et-rule component|case] [--min-et-voxels N]
        [--window X Y Z] [--overlap F] [--batch-size B]
        [--spacing X Y Z | --spacing train | --spacing none] [--no-panels]

Model
  --workdir / --checkpoint   a training run (its newest checkpoint) or one checkpoint: the network
            is built from the checkpoint's config (needs the `train` extra).
  --model   a model file written by segguided_jax.export: the exported function, its parameters
            and settings; nothing of the training stack is imported. Its window is fixed.

Inputs
  --input   a BraTS case folder (BraTS2021_XXXXX with *_t1/_t1ce/_t2/_flair, or
            BraTS-GLI-XXXXX-YYY with -t1n/-t1c/-t2w/-t2f; the edition comes from the folder name,
            or from --edition), a folder of such case folders, an MSD Task01 folder
            (imagesTr/, imagesTs/), or an nnU-Net v2 dataset: its folder, its imagesTs/ or imagesTr/,
            or the channel files CASE_0000.nii.gz ... of one case (channels mapped through its
            dataset.json, or --channels). Several paths may be given.
  --t1 --t1ce --t2 --flair   one case as four explicit files; --case-id names it (default: the
            T1 file name without its extension and modality suffix) and --edition sets the output
            label values (default: the edition the case id is named like, else 2021).
  A segmentation file in a case folder is ignored: prediction needs only the four images.

Outputs in --out (a local folder or gs:// URI), per case, each on the input's exact grid (shape,
affine and header of the case's T1 image), each written whole or not at all (a temporary name
renamed when whole; on object storage one upload); the label map comes last,
so a case that has one has all its outputs, and a case that fails leaves none:
  <case_id>.nii.gz                       uint8 label map in the edition's values (2021: 0, 1 NCR,
                                         2 ED, 4 ET; 2023: ET = 3)
  <case_id>_attention_{NCR,ED,ET}.nii.gz float32 attention maps in [0, 1] (zero outside the brain's
                                         crop box), unless --no-attention or the model has no gates
  <case_id>_probabilities.nii.gz         with --probabilities: float32 (X, Y, Z, 3) ET/TC/WT
  <case_id>_panel.png                    unless --no-panels: see segguided_jax.inference.panels
These names are the ones segguided_jax.evaluate reads (segguided_jax.data.cases). Label values are
the input's own (an nnU-Net dataset's: its dataset.json's) unless --output-format says otherwise:
nnunet (an nnU-Net dataset's values, or nnU-Net's BraTS convention 1 ED, 2 NCR, 3 ET) or brats.

Inference: Gaussian-weighted sliding windows; by default, as nnU-Net, the mean over the 8 mirrorings
(--no-tta: one pass). Labels: segguided_jax.inference.postprocess, with the component sizes learned on the
validation cases at the end of training (the workdir's postprocessing.json) unless
--postprocessing none, and the config's ET rule unless --et-rule / --min-et-voxels say otherwise.

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
import contextlib
import dataclasses
import json
import os
import sys
import time

import numpy as np

from segguided_jax.inference import postprocess
from segguided_jax.io import storage
from segguided_jax.data.brats import EDITIONS, MODALITIES, SUBREGIONS
from segguided_jax.data.cases import (OUTPUT_FORMATS, BadInput, CaseError, CaseFiles, discover, explicit_case,
                                      load_case, output_convention, prediction_files, write_like)
from segguided_jax.data.preprocess import labels_to_original, preprocess, to_original_grid


@dataclasses.dataclass
class Settings:
    probabilities: bool
    panels: bool
    post: postprocess.PostProcessing
    target_spacing: list | None
    spacing_source: str = ""  # where target_spacing came from, for the log
    training_spacing: list | None = None  # voxel size the model was trained at, if known
    output_format: str | None = None  # label values: the input's own, or one of OUTPUT_FORMATS


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


def _write_outputs(cf: CaseFiles, case, outputs: np.ndarray, meta: dict, settings: Settings, out_dir: str) -> None:
    """Writes a case's outputs; on any failure removes what it had written, so a case has all its
    outputs or none."""
    files = prediction_files(out_dir, cf.case_id)
    internal = settings.post.labels(outputs, settings.target_spacing or case.spacing)
    convention = output_convention(cf, settings.output_format)
    labels = labels_to_original(internal, meta, convention)
    written = []
    try:
        attention = None
        if outputs.shape[-1] > 3:
            attention = to_original_grid(outputs[..., 3:6], meta)
            for k, sub in enumerate(SUBREGIONS):
                written.append(files["attention"][sub])
                write_like(np.ascontiguousarray(attention[..., k]), case.reference, written[-1])
        if settings.probabilities:
            written.append(files["probabilities"])
            write_like(to_original_grid(outputs[..., :3], meta), case.reference, written[-1])
        if settings.panels:
            from segguided_jax.inference.panels import save_panel

            written.append(files["panel"])
            save_panel(files["panel"], case.images[..., MODALITIES.index("flair")],
                       case.images[..., MODALITIES.index("t1ce")], convention.to_internal(labels),
                       attention, case.spacing,
                       f"{cf.case_id} (BraTS{cf.edition})" if cf.edition in EDITIONS else cf.case_id,
                       affine=case.affine)
        write_like(labels, case.reference, files["labels"])  # last: a case with a label map has all its outputs
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                storage.remove(path)
        raise


def predict_case(cf: CaseFiles, predictor, settings: Settings, out_dir: str, warn=None) -> dict:
    """Predicts one case and writes its outputs; returns seconds per phase (read, infer, write)."""
    t0 = time.time()
    case = load_case(cf)
    if warn is not None and (msg := spacing_warning(cf.case_id, case.spacing, settings)):
        warn(msg)
    image, _, meta = preprocess(case, settings.target_spacing)
    meta["id"] = cf.case_id
    t1 = time.time()
    outputs = predictor(image)
    t2 = time.time()
    _write_outputs(cf, case, outputs, meta, settings, out_dir)
    return {"read": t1 - t0, "infer": t2 - t1, "write": time.time() - t2}


def predict_all(cases: list, predictor, settings: Settings, out_dir: str, log=print, err=None) -> dict:
    """Predicts every case, going on past failures. Returns {"ok": [ids], "failed": {id: message},
    "seconds": {id: s}}."""
    err = err or (lambda msg: print(msg, file=sys.stderr, flush=True))
    storage.makedirs(out_dir)
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

def _target_spacing(model, flag):
    """(spacing to resample inputs to or None, where it came from, the training voxel size or None)
    for the --spacing flag and a TrainedModel."""
    trained, where = model.spacing.voxel_size, model.spacing_source
    if flag is not None:
        words = [v.lower() for v in flag]
        if words == ["none"]:
            return None, "--spacing none", trained
        if words == ["train"]:
            if trained is None:
                raise ValueError(f"--spacing train: the training manifest {where} gives no spacing; pass three numbers")
            return trained, f"--spacing train ({where})", trained
        if len(flag) != 3:
            raise ValueError(f"--spacing takes three numbers (mm), 'train' or 'none', got {flag}")
        return [float(v) for v in flag], "--spacing", trained
    if model.spacing.manifest is None:
        return None, f"the training manifest {where} is not reachable; inputs keep their own spacing", None
    # As nnU-Net does: inputs are brought to the voxel size the model was trained at.
    return trained, where, trained


def _predictor_settings(args, model):
    """The model's predictor settings with the flags' changes (segguided_jax.inference.trained_model)."""
    return model.predictor_settings(window=args.window, overlap=args.overlap, batch_size=args.batch_size,
                                    mirror_axes=() if args.no_tta else args.mirror_axes,
                                    attention_stages=() if args.no_attention else args.attention_stages)


def _postprocessing(args, model) -> tuple[postprocess.PostProcessing, str]:
    if args.postprocessing == "none":
        learned, where = None, "none"
    elif args.postprocessing == "learned":
        learned = model.learned
        where = "learned on the val cases" if learned else "none learned (no postprocessing.json in the workdir)"
    else:
        learned, where = json.loads(storage.read_text(args.postprocessing)), args.postprocessing
    return model.postprocessing(learned, threshold=args.threshold, et_rule=args.et_rule,
                                min_et_voxels=args.min_et_voxels), where


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segguided_jax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="training workdir (local or gs://): its newest checkpoint")
    model.add_argument("--checkpoint", help="one checkpoint folder, WORKDIR/checkpoints/STEP (local or gs://)")
    model.add_argument("--model", help="a model file written by segguided_jax.export (local or gs://): predicts "
                                       "without the training stack")
    p.add_argument("--input", nargs="+", metavar="PATH", help="case folders or folders of case folders")
    for m in MODALITIES:
        p.add_argument(f"--{m}", metavar="FILE", help=f"the {m} image of one case given file by file")
    p.add_argument("--case-id", help="with --t1 ...: the case id (default: from the T1 file name)")
    p.add_argument("--edition", choices=sorted(EDITIONS),
                   help="with --t1 ...: the output label values (default: from the case id, else 2021); "
                        "with --input: the file naming of case folders not named like BraTS cases")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS,
                   help="label values of the outputs (default: the input's own): nnunet = an nnU-Net dataset's "
                        "(BraTS inputs: nnU-Net's BraTS convention 1 ED, 2 NCR, 3 ET); brats = the BraTS edition's")
    p.add_argument("--channels", nargs=4, metavar="M", type=str.lower,
                   help="nnU-Net inputs: the modality (t1, t1ce, t2, flair) of channels 0000..0003, when "
                        "dataset.json's channel_names are not recognisable")
    p.add_argument("--out", required=True, help="output folder (local or gs://)")
    p.add_argument("--no-tta", action="store_true", help="one pass, no mirroring (default: the 8 mirrorings)")
    p.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    p.add_argument("--mirror-axes", type=int, nargs="+", metavar="A", help="mirror over these axes only (0 1 2)")
    p.add_argument("--attention-stages", type=int, nargs="+", metavar="S",
                   help="decoder stages whose attention maps are averaged: indices coarsest first, "
                        "-1 = finest (default)")
    p.add_argument("--no-attention", action="store_true", help="write no attention maps")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz")
    p.add_argument("--threshold", type=float, help="region probability threshold (default: config.eval)")
    p.add_argument("--postprocessing", default="learned", metavar="learned|none|FILE",
                   help="component-size rule: the one learned on the val cases (default), none, or a JSON file "
                        "like postprocessing.json")
    p.add_argument("--et-rule", choices=("component", "case"),
                   help="ET below --min-et-voxels becomes NCR per component, or for the whole case (nnU-Net)")
    p.add_argument("--min-et-voxels", type=int, help="the ET rule's size; 0: off (default: config.eval)")
    p.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"), help="default: config.eval.window")
    p.add_argument("--overlap", type=float, help="default: config.eval.overlap")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: config.eval.batch_size)")
    p.add_argument("--spacing", nargs="+", metavar="MM",
                   help="resample inputs to this voxel size: 3 numbers in mm, 'train' (the default: the "
                        "training data's voxel size, from its manifest) or 'none' (keep the input's)")
    p.add_argument("--panels", action=argparse.BooleanOptionalAction, default=True,
                   help="write <case>_panel.png (default: on)")
    return p


def _usage_errors(parser, args) -> list:
    explicit = [getattr(args, m) for m in MODALITIES]
    if args.input and any(explicit):
        parser.error("give either --input or --t1 --t1ce --t2 --flair, not both")
    if not args.input and not all(explicit):
        parser.error("give --input, or all four of --t1 --t1ce --t2 --flair"
                     + (f" (missing: {', '.join('--' + m for m, f in zip(MODALITIES, explicit) if not f)})"
                        if any(explicit) else ""))
    if args.no_attention and args.attention_stages is not None:
        parser.error("--no-attention and --attention-stages exclude each other")
    if args.no_tta and args.mirror_axes:
        parser.error("--no-tta and --mirror-axes exclude each other")
    return explicit


def _load_model(args):
    """The TrainedModel of --model, or of --workdir / --checkpoint. A model file is read without
    building the network (no flax, optax, orbax or grain imported)."""
    from segguided_jax.inference.trained_model import TrainedModel

    if args.model:
        return TrainedModel.from_file(args.model)
    return TrainedModel.from_checkpoint(args.workdir or args.checkpoint)


def main(argv=None) -> int:
    """Runs the CLI; returns the exit status (0 all ok, 1 a case failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = _usage_errors(parser, args)

    from segguided_jax.parallel import sharding

    source = args.workdir or args.checkpoint or args.model
    try:
        model = _load_model(args)
        chosen = _predictor_settings(args, model)
        post, post_source = _postprocessing(args, model)
        spacing, spacing_source, trained = _target_spacing(model, args.spacing)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = Settings(probabilities=args.probabilities, panels=args.panels, post=post, target_spacing=spacing,
                        spacing_source=spacing_source, training_spacing=trained, output_format=args.output_format)
    if args.input:
        cases = [cf if isinstance(cf, BadInput) else dataclasses.replace(cf, seg=None)
                 for cf in discover(args.input, args.edition, args.channels)]
    else:
        cases = [explicit_case(dict(zip(MODALITIES, explicit)), args.case_id, args.edition)]
    predictor = model.predictor(chosen, sharding.make_mesh())
    print(f"predict: {len(cases)} case(s) with {source}; window {predictor.window}, overlap {predictor.overlap}, "
          f"batch {predictor.batch_size}, mirror axes {predictor.mirror_axes or 'none'} "
          f"({2 ** len(predictor.mirror_axes)} passes), attention stages {predictor.attention_stages or 'none'}; "
          f"labels: {post.describe()} ({post_source}); target spacing {settings.target_spacing or 'input'} "
          f"({settings.spacing_source})", flush=True)
    t0 = time.time()
    result = predict_all(cases, predictor, settings, args.out)
    total = time.time() - t0
    ok, failed = result["ok"], result["failed"]
    per_case = np.mean(list(result["seconds"].values())) if ok else float("nan")
    print(f"predict: {len(ok)} ok, {len(failed)} failed; {per_case:.1f} s per case "
          f"(the first includes compilation), {total:.1f} s in all; outputs in {args.out}", flush=True)
    for name, msg in failed.items():
        print(f"  failed {name}: {msg}", file=sys.stderr)
    return 1 if failed else 0

