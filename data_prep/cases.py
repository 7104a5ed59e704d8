"""Finding, reading and validating input cases, and preprocessing one case.

Inputs: folders of BraTS2021 or BraTS2023-GLI case folders, or an MSD Task01_BrainTumour folder
(imagesTr/ + labelsTr/, 4D images; imagesTs/ cases have no labels). Every check failure raises
CaseError with the case id and the file it concerns.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from segguided_jax.data.brats import ALL_EDITIONS, EDITIONS, MODALITIES, MSD, MSD_CHANNELS, detect_edition

# Voxel-to-world matrices of a case's files must agree to this (mm); BraTS files agree exactly.
AFFINE_TOLERANCE = 1e-3


class CaseError(Exception):
    """A case that cannot be converted; the message names the case and the file."""


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    case_id: str
    edition: str  # a key of ALL_EDITIONS
    images: tuple  # paths in MODALITIES order, or one 4D path (MSD)
    seg: str | None  # None: a prediction-only case

    def all_files(self):
        return list(self.images) + ([self.seg] if self.seg else [])


def _nifti(path_without_ext: str) -> str:
    """The .nii.gz path, or the .nii one if only that exists."""
    gz = path_without_ext + ".nii.gz"
    return gz if os.path.exists(gz) or not os.path.exists(path_without_ext + ".nii") else path_without_ext + ".nii"


def _brats_case(case_dir: str, edition_name: str) -> CaseFiles:
    edition = EDITIONS[edition_name]
    case_id = os.path.basename(os.path.normpath(case_dir))
    stem = os.path.join(case_dir, f"{case_id}{edition.separator}")
    images = tuple(_nifti(stem + edition.suffixes[m]) for m in MODALITIES)
    seg = _nifti(stem + edition.seg_suffix)
    expected = {os.path.basename(p) for p in images + (seg,)}
    extra = sorted(n for n in os.listdir(case_dir) if n.endswith((".nii", ".nii.gz")) and n not in expected)
    if extra:
        raise CaseError(f"case {case_id}: unexpected file {os.path.join(case_dir, extra[0])} (BraTS{edition_name} "
                        f"cases hold exactly {', '.join(sorted(expected))})")
    return CaseFiles(case_id, edition_name, images, seg if os.path.exists(seg) else None)


def _msd_cases(src: str) -> list[CaseFiles]:
    cases = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = os.path.join(src, images_dir)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.startswith((".", "_")) or not name.endswith((".nii", ".nii.gz")):
                continue  # macOS resource forks (._BRATS_001.nii.gz) ship inside the MSD archive
            case_id = name.split(".nii")[0]
            seg = os.path.join(src, labels_dir, name) if labels_dir else None
            if seg is not None and not os.path.exists(seg):
                raise CaseError(f"case {case_id}: missing file {seg}")
            cases.append(CaseFiles(case_id, "msd", (os.path.join(folder, name),), seg))
    return cases


def find_cases(srcs: list[str], edition: str | None = None) -> tuple[str, list[CaseFiles]]:
    """Every case under the source folders, sorted by id, and their (single) edition."""
    cases, editions, origin = [], set(), {}
    for src in srcs:
        if not os.path.isdir(src):
            raise CaseError(f"{src}: not a folder")
        if edition == "msd" or (edition is None and os.path.isdir(os.path.join(src, "imagesTr"))):
            found = _msd_cases(src)
        else:
            found = []
            for name in sorted(os.listdir(src)):
                path = os.path.join(src, name)
                if not os.path.isdir(path) or name.startswith("."):
                    continue
                e = edition or (detect_edition(name).name if detect_edition(name) else None)
                if e is None or e == "msd":
                    raise CaseError(f"{path}: folder not named like a BraTS2021 or BraTS2023-GLI case")
                found.append(_brats_case(path, e))
        for c in found:
            if c.case_id in origin:
                raise CaseError(f"case {c.case_id}: duplicate case id, in {origin[c.case_id]} and {c.images[0]}")
            origin[c.case_id] = c.images[0]
            editions.add(c.edition)
        cases += found
    if not cases:
        raise CaseError(f"no cases found in {', '.join(srcs)}")
    if len(editions) > 1:
        raise CaseError(f"{', '.join(srcs)}: cases of several editions ({sorted(editions)}); convert each separately")
    return editions.pop(), sorted(cases, key=lambda c: c.case_id)


def read_nifti(case_id: str, path: str):
    """(image, data array, sha256 of the file's bytes); the file is read once."""
    if not os.path.exists(path):
        raise CaseError(f"case {case_id}: missing file {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        digest = hashlib.sha256(raw).hexdigest()
        img = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if path.endswith(".gz") else raw)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # gzip, zlib and nibabel raise many types for damaged files
        raise CaseError(f"case {case_id}: cannot read {path}: {type(e).__name__}: {e}") from e
    return img, data, digest


@dataclasses.dataclass
class LoadedCase:
    case_id: str
    images: np.ndarray  # (4, X, Y, Z) float32, MODALITIES order
    labels: np.ndarray | None  # (X, Y, Z) uint8 internal labels
    affine: np.ndarray
    spacing: list
    header: dict  # what predict needs to write outputs with the input's header
    hashes: dict  # file name -> sha256


def load_case(cf: CaseFiles) -> LoadedCase:
    """Reads and validates every file of a case."""
    cid, hashes = cf.case_id, {}
    if cf.edition == "msd":
        img, data, hashes[os.path.basename(cf.images[0])] = read_nifti(cid, cf.images[0])
        if data.ndim != 4 or data.shape[3] != 4:
            raise CaseError(f"case {cid}: {cf.images[0]} has shape {data.shape}, expected (X, Y, Z, 4)")
        images = np.stack([np.asarray(data[..., MSD_CHANNELS[m]], np.float32) for m in MODALITIES])
        ref = (cf.images[0], images.shape[1:], img.affine, img)
        check_finite = [(cf.images[0], images)]
    else:
        arrays, ref = [], None
        for path in cf.images:
            img, data, hashes[os.path.basename(path)] = read_nifti(cid, path)
            if data.ndim != 3:
                raise CaseError(f"case {cid}: {path} has shape {data.shape}, expected a 3D volume")
            if ref is None:
                ref = (path, data.shape, img.affine, img)
            elif data.shape != ref[1]:
                raise CaseError(f"case {cid}: {path} has shape {data.shape}, but {ref[0]} has {ref[1]}")
            elif not np.allclose(img.affine, ref[2], atol=AFFINE_TOLERANCE):
                raise CaseError(f"case {cid}: {path} has another affine than {ref[0]}:\n{img.affine}\nvs\n{ref[2]}")
            arrays.append(np.asarray(data, np.float32))
        images = np.stack(arrays)
        check_finite = list(zip(cf.images, arrays))
    for path, a in check_finite:
        if not np.isfinite(a).all():
            raise CaseError(f"case {cid}: {path} has {int(np.size(a) - np.isfinite(a).sum())} NaN/Inf voxels")
        if not a.any():
            raise CaseError(f"case {cid}: {path} is zero everywhere: an empty brain")
    labels = None
    if cf.seg is not None:
        seg_img, seg, hashes[os.path.basename(cf.seg)] = read_nifti(cid, cf.seg)
        if seg.shape != ref[1]:
            raise CaseError(f"case {cid}: {cf.seg} has shape {seg.shape}, but {ref[0]} has {ref[1]}")
        if not np.allclose(seg_img.affine, ref[2], atol=AFFINE_TOLERANCE):
            raise CaseError(f"case {cid}: {cf.seg} has another affine than {ref[0]}")
        edition = ALL_EDITIONS[cf.edition]
        values = np.unique(seg)
        bad = sorted(set(values.tolist()) - set(edition.labels))
        if bad:
            raise CaseError(f"case {cid}: {cf.seg} has label value(s) {bad} outside the {edition.name} "
                            f"set {sorted(edition.labels)}")
        labels = edition.to_internal(seg.astype(np.int64))
    hdr = ref[3].header
    spacing = [float(z) for z in hdr.get_zooms()[:3]]
    header = {"qform_code": int(hdr["qform_code"]), "sform_code": int(hdr["sform_code"]),
              "xyzt_units": int(hdr["xyzt_units"]), "image_dtype": str(hdr.get_data_dtype())}
    return LoadedCase(cid, images, labels, np.asarray(ref[2]), spacing, header, hashes)


def preprocess(case: LoadedCase, target_spacing=None):
    """Crop to the brain's box, optionally resample to target_spacing (mm), z-score inside the brain.

    Returns (image (X, Y, Z, 4) float32, labels (X, Y, Z) uint8 or None, meta) where meta holds
    crop_box [[lo, hi)] * 3, the normalisation statistics and the preprocessed shape."""
    brain = np.any(case.images != 0, axis=0)  # load_case has checked it is not empty
    nz = np.argwhere(brain)
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    images = case.images[(slice(None),) + box]
    labels = None if case.labels is None else case.labels[box]
    brain = brain[box]
    if target_spacing is not None and not np.allclose(case.spacing, target_spacing, rtol=1e-3):
        zoom = [s / t for s, t in zip(case.spacing, target_spacing)]
        shape = [max(1, int(round(n * z))) for n, z in zip(brain.shape, zoom)]
        factors = [n / m for n, m in zip(shape, brain.shape)]
        images = np.stack([ndimage.zoom(m, factors, order=3, mode="nearest", grid_mode=True) for m in images])
        brain = ndimage.zoom(brain.astype(np.uint8), factors, order=0, mode="nearest", grid_mode=True) > 0
        if labels is not None:
            labels = ndimage.zoom(labels, factors, order=0, mode="nearest", grid_mode=True)
    out = np.zeros(brain.shape + (len(MODALITIES),), np.float32)
    stats = {}
    for m, modality in enumerate(MODALITIES):
        vals = images[m][brain].astype(np.float64)
        mean, std = float(vals.mean()), float(vals.std())
        out[..., m] = np.where(brain, (images[m] - mean) / max(std, 1e-8), 0)
        stats[modality] = [mean, std]
    meta = {"crop_box": [[int(a), int(b)] for a, b in zip(lo, hi)], "shape": list(out.shape[:3]), "norm": stats}
    return out, labels, meta
