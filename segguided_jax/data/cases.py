"""Cases on disk: finding them, reading and validating their NIfTI files, writing outputs.

Inputs: BraTS2021 or BraTS2023-GLI case folders, folders of such case folders, an MSD
Task01_BrainTumour folder (imagesTr/ + labelsTr/, 4D images; imagesTs/ cases have no labels), or an
nnU-Net v2 raw dataset (its root, its imagesTr/ or imagesTs/ folder, or channel files of one case;
conventions in data.nnunet). Every check failure raises CaseError with the case id and the file it
concerns.

Outputs of prediction, per case, in one flat folder (the names evaluate reads back):
    <case_id>.nii.gz                        label map in the edition's values
    <case_id>_attention_{NCR,ED,ET}.nii.gz  attention maps
    <case_id>_probabilities.nii.gz          region probabilities (ET, TC, WT)
    <case_id>_panel.png                     a picture of the case
"""
from __future__ import annotations

import dataclasses
import re

import nibabel as nib
import numpy as np

from segguided_jax.io import storage
from segguided_jax.data import nnunet
from segguided_jax.data.brats import (ALL_EDITIONS, EDITIONS, MODALITIES, MSD_CHANNELS, SUBREGIONS, Edition,
                                      detect_edition)

# Voxel-to-world matrices of a case's files must agree to this (mm); BraTS files agree exactly.
AFFINE_TOLERANCE = 1e-3
NII = ".nii.gz"
ATTENTION_INFIX = "_attention_"
PROBABILITIES_SUFFIX = "_probabilities"


class CaseError(Exception):
    """A case that cannot be used; the message names the case and the file."""


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    case_id: str
    edition: str  # a key of ALL_EDITIONS, or "nnunet"
    images: tuple  # paths in MODALITIES order, or one 4D path (MSD)
    seg: str | None  # None: a prediction-only case
    dataset_labels: Edition | None = None  # an nnU-Net dataset's own label values (its dataset.json)

    @property
    def convention(self) -> Edition:
        """The label values of the case's files."""
        return self.dataset_labels or ALL_EDITIONS[self.edition]


OUTPUT_FORMATS = ("nnunet", "brats")


def output_convention(cf: CaseFiles, output_format: str | None = None) -> Edition:
    """The label values a prediction of `cf` is written in: the input's own (None); "nnunet": an
    nnU-Net case's dataset values, else nnU-Net's BraTS convention (1 ED, 2 NCR, 3 ET); "brats": a
    BraTS case's edition, else the edition its id is named like, else BraTS2021 (ET = 4)."""
    if output_format is None:
        return cf.convention
    if output_format == "nnunet":
        return cf.dataset_labels or nnunet.brats_convention()
    if output_format == "brats":
        return EDITIONS.get(cf.edition) or detect_edition(cf.case_id) or EDITIONS["2021"]
    raise ValueError(f"output format {output_format!r}: one of {OUTPUT_FORMATS}")


@dataclasses.dataclass(frozen=True)
class BadInput:
    """An input that could not be turned into a case, with the reason (naming the path)."""
    name: str
    error: str


# ---------------------------------------------------------------------------------------------
# Finding cases

def _nifti(path_without_ext: str) -> str:
    """The .nii.gz path, or the .nii one if only that exists."""
    gz = path_without_ext + NII
    return gz if storage.exists(gz) or not storage.exists(path_without_ext + ".nii") else path_without_ext + ".nii"


def brats_case(case_dir: str, edition: str | None = None) -> CaseFiles:
    """The files of one BraTS case folder; the edition comes from the folder's name unless given."""
    case_id = storage.basename(storage.abspath(case_dir))
    if edition is None:
        detected = detect_edition(case_id)
        if detected is None:
            raise CaseError(f"{case_dir}: folder not named like a BraTS2021 (BraTS2021_XXXXX) or BraTS2023-GLI "
                            "(BraTS-GLI-XXXXX-YYY) case; rename it or pass --edition")
        edition = detected.name
    spec = EDITIONS[edition]
    stem = storage.join(case_dir, f"{case_id}{spec.separator}")
    images = tuple(_nifti(stem + spec.suffixes[m]) for m in MODALITIES)
    seg = _nifti(stem + spec.seg_suffix)
    expected = {storage.basename(p) for p in images + (seg,)}
    extra = sorted(n for n in storage.listdir(case_dir) if n.endswith((".nii", NII)) and n not in expected)
    if extra:
        raise CaseError(f"case {case_id}: unexpected file {storage.join(case_dir, extra[0])} (BraTS{edition} "
                        f"cases hold exactly {', '.join(sorted(expected))})")
    return CaseFiles(case_id, edition, images, seg if storage.exists(seg) else None)


def _msd_cases(src: str) -> list[CaseFiles]:
    cases = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = storage.join(src, images_dir)
        if not storage.isdir(folder):
            continue
        for name in sorted(storage.listdir(folder)):
            if name.startswith((".", "_")) or not name.endswith((".nii", NII)):
                continue  # macOS resource forks (._BRATS_001.nii.gz) ship inside the MSD archive
            case_id = name.split(".nii")[0]
            seg = storage.join(src, labels_dir, name) if labels_dir else None
            if seg is not None and not storage.exists(seg):
                raise CaseError(f"case {case_id}: missing file {seg}")
            cases.append(CaseFiles(case_id, "msd", (storage.join(folder, name),), seg))
    return cases


def _visible_files(folder: str) -> list[str]:
    return sorted(n for n in storage.listdir(folder) if not n.startswith((".", "_"))) if storage.isdir(folder) else []


def _nnunet_folder_cases(ds: nnunet.Dataset, folder: str, only: str | None) -> list:
    """CaseFiles (or BadInput) of one images folder of a dataset (of the case `only` if given);
    labels from the matching labels folder (imagesTr: labelsTr, imagesTs: labelsTs)."""
    labels_dir = "labels" + folder[len("images"):]
    image_dir, found, by_case = storage.join(ds.root, folder), [], {}
    for name in _visible_files(image_dir):
        parsed = nnunet.split_channel_file(name, ds.file_ending)
        if parsed is not None and parsed[1] < ds.num_channels:
            by_case.setdefault(parsed[0], set()).add(parsed[1])
        elif only is None or name.startswith(only):
            found.append(BadInput(storage.join(image_dir, name), (
                f"unexpected file {storage.join(image_dir, name)} (expected CASE_0000{ds.file_ending} to "
                f"CASE_{ds.num_channels - 1:04d}{ds.file_ending}: the file_ending and {ds.num_channels} channels "
                f"of {ds.json_path})")))
    if only is None:
        for name in _visible_files(storage.join(ds.root, labels_dir)):
            path = storage.join(ds.root, labels_dir, name)
            case_id = name[: -len(ds.file_ending)] if name.endswith(ds.file_ending) else None
            if case_id is None:
                found.append(BadInput(name, f"unexpected file {path} (the file_ending of {ds.json_path} is "
                                            f"{ds.file_ending})"))
            elif case_id not in by_case:
                found.append(BadInput(case_id, f"case {case_id}: label file {path} has no images "
                                               f"{ds.channel_file(folder, case_id, 0)} ... in {image_dir}"))
    for case_id in sorted(by_case) if only is None else [only]:
        missing = [ch for ch in range(ds.num_channels) if ch not in by_case.get(case_id, ())]
        if missing:
            absent = ds.channel_file(folder, case_id, missing[0])
            found.append(BadInput(case_id, f"case {case_id}: missing file {absent} (channel {missing[0]} of "
                                           f"{ds.json_path})"))
            continue
        seg = ds.label_file(labels_dir, case_id)
        found.append(CaseFiles(case_id, "nnunet", ds.images(folder, case_id), seg if storage.exists(seg) else None,
                               ds.edition))
    return found


def _nnunet_cases(path: str, channels=None) -> list:
    """CaseFiles (or BadInput) of an nnU-Net dataset: of its imagesTr/ and imagesTs/ if `path` is
    the dataset, of one of those folders, or of the one case whose channel file `path` is.
    imagesTr cases take their labels from labelsTr, imagesTs cases from labelsTs if present;
    a case without a label file is prediction-only."""
    root = nnunet.dataset_root_of(path)
    try:
        ds = nnunet.read_dataset(root, channels)
    except nnunet.DatasetError as e:
        return [BadInput(path, str(e))]
    only = None
    if storage.isfile(path):
        parsed = nnunet.split_channel_file(storage.basename(path), ds.file_ending)
        if parsed is None:
            return [BadInput(path, f"{path}: not an nnU-Net channel file CASE_XXXX{ds.file_ending} "
                                   f"(the file_ending of {ds.json_path})")]
        only, folders = parsed[0], [storage.basename(storage.dirname(storage.abspath(path)))]
    elif storage.abspath(path) == root:
        folders = ["imagesTr", "imagesTs"]
    else:
        folders = [storage.basename(storage.abspath(path))]
    if not set(folders) <= {"imagesTr", "imagesTs"}:
        return [BadInput(path, f"{path}: give the nnU-Net dataset {root}, its imagesTr/ or imagesTs/, "
                               "or channel files of one case")]
    return [cf for folder in folders for cf in _nnunet_folder_cases(ds, folder, only)]


def _is_msd(path: str) -> bool:
    return any(storage.isdir(storage.join(path, d)) for d in ("imagesTr", "imagesTs"))


def _cases_in(path: str, edition: str | None, channels=None) -> list:
    """CaseFiles (or BadInput for a bad case folder) under one path."""
    if not storage.exists(path):
        return [BadInput(path, f"{path}: no such file or folder")]
    if edition in (None, "nnunet") and nnunet.dataset_root_of(path) is not None:
        return _nnunet_cases(path, channels)
    if edition == "nnunet":
        return [BadInput(path, f"{path}: no nnU-Net {nnunet.DATASET_JSON} with channel_names in it or above it")]
    if not storage.isdir(path):
        return [BadInput(path, f"{path}: not a folder (give case folders or folders of case folders)")]
    try:
        if edition == "msd" or (edition is None and _is_msd(path)):
            return _msd_cases(path)
        if any(n.endswith((".nii", NII)) for n in storage.listdir(path)):
            return [brats_case(path, edition)]
        subs = sorted(n for n in storage.listdir(path) if not n.startswith(".") and storage.isdir(storage.join(path, n)))
        if not subs:
            return [BadInput(path, f"{path}: no case folders and no NIfTI files in it")]
    except CaseError as e:
        return [BadInput(path, str(e))]
    found = []
    for name in subs:
        try:
            found.append(brats_case(storage.join(path, name), edition))
        except CaseError as e:
            found.append(BadInput(storage.join(path, name), str(e)))
    return found


def discover(paths, edition: str | None = None, channels=None) -> list:
    """Every case under `paths`, in the order found: CaseFiles, or BadInput for what could not be
    read as a case (so that one bad folder need not stop the others).

    A path is an nnU-Net dataset if it, or a folder above it, holds an nnU-Net dataset.json
    (`channels`: the modality of each of its channels, when their names are not recognisable), an
    MSD folder if it holds imagesTr/ or imagesTs/, a case folder if it holds NIfTI files, else a
    folder of case folders. A case id seen twice is a BadInput the second time (several channel
    files of one nnU-Net case are that case once)."""
    found, origin, seen = [], {}, set()
    for path in [paths] if isinstance(paths, str) else paths:
        for cf in _cases_in(path, edition, channels):
            if isinstance(cf, CaseFiles):
                if (cf.case_id, cf.images) in seen:
                    continue
                seen.add((cf.case_id, cf.images))
                if cf.case_id in origin:
                    cf = BadInput(cf.case_id, f"case {cf.case_id}: duplicate case id, in {origin[cf.case_id]} and "
                                              f"{cf.images[0]}")
                else:
                    origin[cf.case_id] = cf.images[0]
            found.append(cf)
    return found


def find_cases(srcs, edition: str | None = None, channels=None) -> tuple[str, list[CaseFiles]]:
    """Every case under the source folders, sorted by id, and their (single) edition; raises
    CaseError on the first problem."""
    found = discover(srcs, edition, channels)
    for cf in found:
        if isinstance(cf, BadInput):
            raise CaseError(cf.error)
    if not found:
        raise CaseError(f"no cases found in {', '.join([srcs] if isinstance(srcs, str) else srcs)}")
    editions = {cf.edition for cf in found}
    if len(editions) > 1:
        raise CaseError(f"cases of several editions ({sorted(editions)}); convert each separately")
    return editions.pop(), sorted(found, key=lambda c: c.case_id)


def case_id_from_file(path: str) -> str:
    """The case id in a T1 file name: BraTS2021_00000_t1.nii.gz -> BraTS2021_00000,
    BraTS-GLI-00000-000-t1n.nii.gz -> BraTS-GLI-00000-000; other names lose only the extension."""
    name = storage.basename(path)
    for ext in (NII, ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return re.sub(r"[_-](t1|t1n)$", "", name, flags=re.IGNORECASE) or name


def explicit_case(files: dict, case_id: str | None = None, edition: str | None = None) -> CaseFiles:
    """A case given as {modality: path} for the four MODALITIES; the id defaults to the T1 file's
    and the edition to the one the id is named like, else 2021."""
    case_id = case_id or case_id_from_file(files["t1"])
    if edition is None:
        detected = detect_edition(case_id)
        edition = detected.name if detected else "2021"
    return CaseFiles(case_id, edition, tuple(files[m] for m in MODALITIES), None)


# ---------------------------------------------------------------------------------------------
# Reading and validating

def read_nifti(case_id: str, path: str):
    """(image, data array, sha256 of the file's bytes) from a local path or a gs:// URI; the file
    is read once. Any failure is a CaseError naming the case and the file."""
    if not storage.exists(path):
        raise CaseError(f"case {case_id}: missing file {path}")
    try:
        img, digest = storage.read_nifti(path)
        data = np.asanyarray(img.dataobj)
    except storage.StorageUnavailable:
        raise
    except Exception as e:  # gzip, zlib and nibabel raise many types for damaged files
        raise CaseError(f"case {case_id}: cannot read {path}: {type(e).__name__}: {e}") from e
    return img, data, digest


@dataclasses.dataclass
class LoadedCase:
    case_id: str
    images: np.ndarray  # (X, Y, Z, 4) float32, channels last in MODALITIES order
    labels: np.ndarray | None  # (X, Y, Z) uint8 internal labels
    affine: np.ndarray
    spacing: list
    header: dict  # what predict needs to write outputs with the input's header
    hashes: dict  # file name -> sha256
    reference: nib.Nifti1Image  # the T1 (or the 4D MSD) image: affine and header for outputs


def _check_image(cid: str, path: str, a: np.ndarray) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        raise CaseError(f"case {cid}: {path} has {int(a.size - finite.sum())} NaN/Inf voxels")
    if not a.any():
        raise CaseError(f"case {cid}: {path} is zero everywhere: an empty brain")


def load_case(cf: CaseFiles) -> LoadedCase:
    """Reads and validates every file of a case (its seg too, if it has one)."""
    cid, hashes = cf.case_id, {}
    if cf.edition == "msd":
        img, data, hashes[storage.basename(cf.images[0])] = read_nifti(cid, cf.images[0])
        if data.ndim != 4 or data.shape[3] != 4:
            raise CaseError(f"case {cid}: {cf.images[0]} has shape {data.shape}, expected (X, Y, Z, 4)")
        images = np.stack([np.asarray(data[..., MSD_CHANNELS[m]], np.float32) for m in MODALITIES], axis=-1)
        ref = (cf.images[0], images.shape[:3], img.affine, img)
        for m in MODALITIES:
            _check_image(cid, cf.images[0], images[..., MODALITIES.index(m)])
    else:
        images, ref = None, None
        for k, path in enumerate(cf.images):
            img, data, hashes[storage.basename(path)] = read_nifti(cid, path)
            if data.ndim != 3:
                raise CaseError(f"case {cid}: {path} has shape {data.shape}, expected a 3D volume")
            if ref is None:
                ref = (path, data.shape, img.affine, img)
                images = np.empty(data.shape + (len(cf.images),), np.float32)
            elif data.shape != ref[1]:
                raise CaseError(f"case {cid}: {path} has shape {data.shape}, but {ref[0]} has {ref[1]}")
            elif not np.allclose(img.affine, ref[2], atol=AFFINE_TOLERANCE):
                raise CaseError(f"case {cid}: {path} has another affine than {ref[0]}:\n{img.affine}\nvs\n{ref[2]}")
            images[..., k] = data
            _check_image(cid, path, images[..., k])
    labels = None
    if cf.seg is not None:
        seg_img, seg, hashes[storage.basename(cf.seg)] = read_nifti(cid, cf.seg)
        if seg.shape != ref[1]:
            raise CaseError(f"case {cid}: {cf.seg} has shape {seg.shape}, but {ref[0]} has {ref[1]}")
        if not np.allclose(seg_img.affine, ref[2], atol=AFFINE_TOLERANCE):
            raise CaseError(f"case {cid}: {cf.seg} has another affine than {ref[0]}")
        edition = cf.convention
        bad = sorted(set(np.unique(seg).tolist()) - set(edition.labels))
        if bad:
            source = f" (its {nnunet.DATASET_JSON})" if cf.dataset_labels else ""
            raise CaseError(f"case {cid}: {cf.seg} has label value(s) {bad} outside the {edition.name} "
                            f"set {sorted(edition.labels)}{source}")
        labels = edition.to_internal(seg.astype(np.int64))
    hdr = ref[3].header
    spacing = [float(z) for z in hdr.get_zooms()[:3]]
    header = {"qform_code": int(hdr["qform_code"]), "sform_code": int(hdr["sform_code"]),
              "xyzt_units": int(hdr["xyzt_units"]), "image_dtype": str(hdr.get_data_dtype())}
    return LoadedCase(cid, images, labels, np.asarray(ref[2]), spacing, header, hashes, ref[3])


# ---------------------------------------------------------------------------------------------
# Writing

def write_like(data: np.ndarray, reference: nib.Nifti1Image, path: str) -> None:
    """Writes data (X, Y, Z[, C]) with the reference image's affine and header (its data type set
    to data's; a 4D reference gives its spatial part)."""
    header = reference.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["cal_min"], header["cal_max"] = 0, 0  # the T1's display range means nothing here
    storage.write_nifti_gz(nib.Nifti1Image(data, reference.affine, header), path)


def prediction_files(out_dir: str, case_id: str) -> dict:
    """The paths of a case's prediction outputs: {"labels", "probabilities", "panel",
    "attention": {sub-region: path}} (see the module docstring)."""
    stem = storage.join(out_dir, case_id)
    return {"labels": stem + NII, "probabilities": stem + PROBABILITIES_SUFFIX + NII, "panel": stem + "_panel.png",
            "attention": {s: f"{stem}{ATTENTION_INFIX}{s}{NII}" for s in SUBREGIONS}}


def parse_prediction_file(name: str) -> tuple[str, str] | None:
    """A file name in a prediction folder -> (case_id, kind), kind "labels", "probabilities" or a
    sub-region name (an attention map); None for other files. Names end in .nii.gz, or in .nii as
    nnU-Net writes the predictions of a dataset whose file_ending is .nii."""
    if not name.endswith((NII, ".nii")) or name.startswith("."):
        return None
    stem = name[: -len(NII)] if name.endswith(NII) else name[: -len(".nii")]
    if stem.endswith(PROBABILITIES_SUFFIX):
        return stem[: -len(PROBABILITIES_SUFFIX)], "probabilities"
    head, sep, sub = stem.rpartition(ATTENTION_INFIX)
    if sep and sub in SUBREGIONS:
        return head, sub
    return stem, "labels"
