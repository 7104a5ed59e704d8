"""BraTS-layout case folders -> ArrayRecord shards + manifest.json.

    python -m data_prep.convert --src DIR --out DIR [--val-fraction 0.2] [--split-seed 0]

Every case is validated, cropped to the brain's non-zero box, z-scored per modality inside the
brain, and its labels mapped to the internal scheme (0 bg, 1 NCR, 2 ED, 3 ET). The manifest keeps
what is needed to undo this (original shape, affine, crop box, normalisation statistics) and the
train/val split, which is drawn from --split-seed.

A bad case stops the conversion with a message naming the case and the file; shards are written
into a staging folder and moved into --out only when every case has converted, so a failed run
leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import nibabel as nib
import numpy as np

from segguided_jax.data.brats import EDITIONS, MODALITIES, Edition, detect_edition
from segguided_jax.data.records import MANIFEST, MANIFEST_VERSION, encode_case


class CaseError(Exception):
    """A case that cannot be converted; the message names the case and the file."""


def find_cases(src: str) -> tuple[Edition, list[str]]:
    """The case folders under src and their edition (all cases must share one)."""
    if not os.path.isdir(src):
        raise CaseError(f"{src}: not a folder")
    names = sorted(n for n in os.listdir(src) if os.path.isdir(os.path.join(src, n)))
    editions = {n: detect_edition(n) for n in names}
    unknown = [n for n, e in editions.items() if e is None]
    if unknown:
        raise CaseError(f"{src}: folder(s) not named like a BraTS case: {', '.join(unknown[:5])}")
    found = {e.name for e in editions.values()}
    if len(found) != 1:
        raise CaseError(f"{src}: expected cases of one BraTS edition, found {sorted(found) or 'none'}")
    return next(iter(editions.values())), [os.path.join(src, n) for n in names]


def _load(case_id: str, path: str):
    """(image, data) of one NIfTI file, or a CaseError naming the case and the file."""
    if not os.path.exists(path):
        raise CaseError(f"case {case_id}: missing file {path}")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)  # reads (and decompresses) the whole file
    except Exception as e:  # nibabel, gzip and zlib raise many types for damaged files
        raise CaseError(f"case {case_id}: cannot read {path}: {type(e).__name__}: {e}") from e
    if data.ndim != 3:
        raise CaseError(f"case {case_id}: {path} has shape {data.shape}, expected a 3D volume")
    return img, data


def load_case(case_dir: str, edition: Edition):
    """Reads and validates one case folder. Returns (case_id, images (4, X, Y, Z) float32 in
    MODALITIES order, internal labels or None, affine, zooms)."""
    case_id = os.path.basename(os.path.normpath(case_dir))
    files = edition.modality_files(case_dir)
    images, ref = [], None
    for modality in MODALITIES:
        img, data = _load(case_id, files[modality])
        if ref is None:
            ref = (files[modality], data.shape, img.affine, [float(z) for z in img.header.get_zooms()[:3]])
        elif data.shape != ref[1]:
            raise CaseError(f"case {case_id}: {files[modality]} has shape {data.shape}, but "
                            f"{ref[0]} has {ref[1]}")
        images.append(np.asarray(data, np.float32))
    seg_path = edition.seg_file(case_dir)
    labels = None
    if os.path.exists(seg_path):
        _, seg = _load(case_id, seg_path)
        if seg.shape != ref[1]:
            raise CaseError(f"case {case_id}: {seg_path} has shape {seg.shape}, but {ref[0]} has {ref[1]}")
        values = np.unique(seg)
        bad = sorted(set(values.tolist()) - set(edition.labels))
        if bad:
            raise CaseError(f"case {case_id}: {seg_path} has label value(s) {bad} outside BraTS"
                            f"{edition.name}'s set {list(edition.labels)}")
        labels = edition.to_internal(seg.astype(np.int64))
    return case_id, np.stack(images), labels, ref[2], ref[3]


def preprocess(case_id: str, images: np.ndarray, labels: np.ndarray | None):
    """Crop to the brain's box and z-score inside the brain. Returns (image (X, Y, Z, 4),
    labels or None, crop_box [[lo, hi]] * 3, {modality: [mean, std]})."""
    brain = np.any(images != 0, axis=0)
    if not brain.any():
        raise CaseError(f"case {case_id}: every modality is zero: no brain to crop to")
    nz = np.argwhere(brain)
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    brain = brain[box]
    out = np.zeros(brain.shape + (len(MODALITIES),), np.float32)
    stats = {}
    for m, modality in enumerate(MODALITIES):
        x = images[m][box]
        vals = x[brain].astype(np.float64)
        mean, std = float(vals.mean()), float(vals.std())
        out[..., m] = np.where(brain, (x - mean) / max(std, 1e-8), 0)
        stats[modality] = [mean, std]
    crop = [[int(a), int(b)] for a, b in zip(lo, hi)]
    return out, (None if labels is None else labels[box]), crop, stats


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> dict:
    """Deterministic train/val assignment from the seed."""
    order = np.random.default_rng(seed).permutation(len(case_ids))
    n_val = int(round(val_fraction * len(case_ids)))
    val = {case_ids[i] for i in order[:n_val]}
    return {c: ("val" if c in val else "train") for c in case_ids}


def convert(src: str, out: str, *, val_fraction: float = 0.2, split_seed: int = 0,
            cases_per_shard: int = 16, log=print) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    edition, case_dirs = find_cases(src)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise CaseError(f"{out} already holds a converted set ({MANIFEST}); choose another --out")
    stage = tempfile.mkdtemp(prefix=".converting-", dir=out)
    try:
        cases, shards, writer = [], [], None
        n_shards = (len(case_dirs) + cases_per_shard - 1) // cases_per_shard
        for i, case_dir in enumerate(case_dirs):
            if i % cases_per_shard == 0:
                if writer is not None:
                    writer.close()
                shards.append(f"cases-{len(shards):05d}-of-{n_shards:05d}.array_record")
                writer = ArrayRecordWriter(os.path.join(stage, shards[-1]), "group_size:1")
            case_id, images, labels, affine, zooms = load_case(case_dir, edition)
            image, label, crop, stats = preprocess(case_id, images, labels)
            writer.write(encode_case(case_id, image, label))
            cases.append({"id": case_id, "record": i, "shard": shards[-1], "has_label": label is not None,
                          "orig_shape": list(images.shape[1:]), "shape": list(image.shape[:3]),
                          "crop_box": crop, "affine": np.asarray(affine).tolist(), "spacing": zooms,
                          "norm": stats})
            log(f"\rconvert: {i + 1}/{len(case_dirs)} cases", end="", flush=True)
        if writer is not None:
            writer.close()
        log("")
        splits = split_cases([c["id"] for c in cases if c["has_label"]], val_fraction, split_seed)
        for c in cases:
            c["split"] = splits.get(c["id"], "predict")
        manifest = {"version": MANIFEST_VERSION, "edition": edition.name, "modalities": list(MODALITIES),
                    "label_values": list(edition.labels), "split_seed": split_seed,
                    "val_fraction": val_fraction, "shards": shards, "cases": cases}
        for s in shards:
            os.replace(os.path.join(stage, s), os.path.join(out, s))
        tmp = os.path.join(stage, MANIFEST)
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(out, MANIFEST))  # written last: its presence means complete
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    n_val = sum(c["split"] == "val" for c in cases)
    log(f"converted {len(cases)} BraTS{edition.name} cases ({len(cases) - n_val} train, {n_val} val) "
        f"into {len(shards)} shard(s) in {out}")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--cases-per-shard", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, val_fraction=args.val_fraction, split_seed=args.split_seed,
                cases_per_shard=args.cases_per_shard)
    except CaseError as e:
        sys.exit(f"convert: error: {e}")


if __name__ == "__main__":
    main()
