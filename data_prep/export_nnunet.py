"""BraTS-layout case folders -> an nnU-Net v2 raw dataset, so nnU-Net trains on exactly our splits.

    python -m data_prep.export_nnunet --src DIR [DIR ...] --out nnUNet_raw/DatasetXXX_Name
        [--edition 2021|2023] [--splits PREPARED/splits.json]

Writes the convention of nnU-Net's own BraTS 2021 conversion (segguided_jax.data.nnunet):
  imagesTr/CASE_0000.nii.gz .. CASE_0003.nii.gz   T1, T1ce, T2, FLAIR, the input files' bytes
  labelsTr/CASE.nii.gz                             labels 1 ED, 2 NCR, 3 ET (uint8, the seg's grid)
  imagesTs/                                        cases without a segmentation, and with --splits
                                                   the held-out test cases (their labels in labelsTs/,
                                                   which nnU-Net never reads)
  dataset.json                                     channel_names, region labels WT/TC/ET with
                                                   regions_class_order, numTraining, file_ending
  splits_final.json                                with --splits: our fold0..fold{k-1} as nnU-Net's
                                                   folds 0..k-1 and our holdout split as fold k
nnU-Net's trainer reads splits_final.json from nnUNet_preprocessed/DatasetXXX_Name/; its planner
(nnU-Net 2.8) copies it there from the raw dataset, older versions need it copied by hand.

Every case is read and checked as data_prep.convert checks it (a failure names the case and the
file). The dataset is written under a temporary name beside --out and renamed when whole, so an
error leaves nothing behind; --out must not exist yet.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import sys

import nibabel as nib
import numpy as np

from segguided_jax.io import storage
from segguided_jax.data import nnunet
from segguided_jax.data.brats import MODALITIES
from segguided_jax.data.cases import CaseError, find_cases, load_case, read_nifti
from segguided_jax.data.splits import PARTS

# nnU-Net's own requirement on a raw dataset's folder name (nnunetv2.utilities.dataset_name_id_conversion).
DATASET_NAME = r"Dataset\d{3}_.+"


def nnunet_splits(splits: dict) -> list[dict]:
    """nnU-Net's splits_final.json (a list of {"train", "val"}) from our splits.json: fold k of
    ours is nnU-Net's fold k, and the holdout split comes last. Test cases are in no fold."""
    folds = [splits[f"fold{k}"] for k in range(splits.get("folds", 0)) if f"fold{k}" in splits]
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds + [splits["holdout"]]]


def _copy_channel(src: str, dst: str) -> None:
    """The input file's bytes (gzipped if it was a plain .nii): nnU-Net reads the same voxels."""
    if src.endswith(".gz"):
        storage.copy_file(src, dst)
    else:
        storage.write_bytes(dst, gzip.compress(storage.read_bytes(src), compresslevel=6, mtime=0))


def export(srcs, out: str, *, edition: str | None = None, splits_file: str | None = None, log=print) -> dict:
    """Writes the cases under `srcs` as the nnU-Net dataset `out` (see the module docstring);
    returns its dataset.json."""
    out = os.path.normpath(out)
    if not re.fullmatch(DATASET_NAME, os.path.basename(out)):
        raise CaseError(f"--out {out}: nnU-Net needs a folder named DatasetXXX_Name (three digits), "
                        f"e.g. Dataset137_BraTS2021")
    if os.path.exists(out):
        raise CaseError(f"--out {out} exists; choose a new dataset folder")
    edition, cases = find_cases(srcs, edition)
    if edition not in ("2021", "2023"):
        raise CaseError(f"export_nnunet reads BraTS2021 or BraTS2023-GLI case folders, not {edition} cases")
    labelled = sorted(cf.case_id for cf in cases if cf.seg is not None)
    test, splits_final = set(), None
    if splits_file is not None:
        with open(splits_file) as f:
            splits = json.load(f)
        ours = sorted({c for part in PARTS for c in splits["holdout"][part]})
        if ours != labelled:
            extra, absent = sorted(set(ours) - set(labelled)), sorted(set(labelled) - set(ours))
            raise CaseError(f"{splits_file} splits other cases than the labelled ones in {', '.join(srcs)}: "
                            f"{len(extra)} not found (e.g. {extra[:3]}), {len(absent)} not split (e.g. {absent[:3]})")
        test = set(splits["holdout"]["test"])
        splits_final = nnunet_splits(splits)
    convention = nnunet.brats_convention()
    # The BraTS convention lists channels T1, T1ce, T2, FLAIR: MODALITIES' order.
    channel_of = {m: int(k) for k, name in nnunet.BRATS_CHANNEL_NAMES.items()
                  for m in MODALITIES if name.lower() == m}
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        for d in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if test else ()):
            os.makedirs(os.path.join(tmp, d))
        for i, cf in enumerate(cases):
            case = load_case(cf)  # every check convert makes
            train = cf.seg is not None and cf.case_id not in test
            images_dir, labels_dir = ("imagesTr", "labelsTr") if train else ("imagesTs", "labelsTs")
            for m, src in zip(MODALITIES, cf.images):
                _copy_channel(src, os.path.join(tmp, images_dir, f"{cf.case_id}_{channel_of[m]:04d}.nii.gz"))
            if cf.seg is not None:
                seg_img, _, _ = read_nifti(cf.case_id, cf.seg)
                header = seg_img.header.copy()
                header.set_data_dtype(np.uint8)
                storage.write_nifti_gz(nib.Nifti1Image(convention.from_internal(case.labels), seg_img.affine, header),
                               os.path.join(tmp, labels_dir, cf.case_id + ".nii.gz"))
            log(f"export: {i + 1}/{len(cases)} {cf.case_id} -> {images_dir}", flush=True)
        num_training = sum(1 for c in labelled if c not in test)
        spec = nnunet.brats_dataset_json(num_training, os.path.basename(out).split("_", 1)[1])
        with open(os.path.join(tmp, nnunet.DATASET_JSON), "w") as f:
            json.dump(spec, f, indent=1)
        if splits_final is not None:
            with open(os.path.join(tmp, nnunet.SPLITS_FINAL), "w") as f:
                json.dump(splits_final, f, indent=1)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        os.rename(tmp, out)  # the dataset appears under its name only when whole
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    log(f"exported {len(cases)} BraTS{edition} cases to {out}: {num_training} in imagesTr, {len(test)} held-out test "
        f"and {len(cases) - len(labelled)} unlabelled in imagesTs"
        + (f"; {nnunet.SPLITS_FINAL} with {len(splits_final)} folds" if splits_final else ""))
    return spec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, nargs="+", help="BraTS case folders or folders of them")
    parser.add_argument("--out", required=True, help="the new dataset folder, nnUNet_raw/DatasetXXX_Name")
    parser.add_argument("--edition", choices=["2021", "2023"], help="default: detected from the names")
    parser.add_argument("--splits", help="splits.json of a data_prep.convert output: held-out test cases go to "
                                         "imagesTs/labelsTs and the folds to splits_final.json")
    args = parser.parse_args(argv)
    try:
        export(args.src, args.out, edition=args.edition, splits_file=args.splits)
    except CaseError as e:
        sys.exit(f"export_nnunet: error: {e}")


if __name__ == "__main__":
    main()
