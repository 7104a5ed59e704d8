"""nnU-Net v2 raw datasets (nnUNet_raw/DatasetXXX_Name): their dataset.json, channel and label
conventions, and the file names of their cases.

The layout (nnU-Net v2's documentation/dataset_format.md):
    dataset.json          channel_names {"0": name, ...}, labels {name: value or [values]},
                          numTraining, file_ending, and regions_class_order for region labels
    imagesTr/CASE_0000<file_ending> ... CASE_000{k}<file_ending>   one file per channel
    labelsTr/CASE<file_ending>
    imagesTs/CASE_XXXX<file_ending>    cases without labels (prediction only)
    labelsTs/CASE<file_ending>         not part of nnU-Net's format; read when present, so held-out
                                       cases written by data_prep.export_nnunet keep their labels
Channels are mapped to MODALITIES by their names (or by an explicit list); label values to the
internal scheme (0 bg, 1 NCR, 2 ED, 3 ET) by their names (plain labels) or by the nesting of the
regions (region labels: the largest region is WT, the next TC, the smallest ET). Both become an
Edition whose `labels` are the dataset's values for (bg, NCR, ED, ET), so the rest of the code
reads and writes them like a BraTS edition's. This module knows names and conventions only;
data.cases turns what it finds into cases.
"""
from __future__ import annotations

import dataclasses
import json
import re

from segguided_jax.io import storage
from segguided_jax.data.brats import MODALITIES, Edition

DATASET_JSON = "dataset.json"
SPLITS_FINAL = "splits_final.json"
CHANNEL_DIGITS = 4  # CASE_0000: nnU-Net's channel suffix
FILE_ENDINGS = (".nii.gz", ".nii")  # the NIfTI endings nnU-Net's readers take

# Channel names as datasets spell them, after lower-casing and dropping everything but letters and
# digits: nnU-Net's BraTS conversions (T1, T1ce, T2, Flair), MSD Task01 (FLAIR, T1w, t1gd, T2w),
# BraTS 2023 file suffixes (t1n, t1c, t2w, t2f).
CHANNEL_NAMES = {
    "t1": {"t1", "t1w", "t1n", "t1native", "nativet1"},
    "t1ce": {"t1ce", "t1c", "t1gd", "t1wce", "t1post", "t1contrast", "t1wgd", "t1gad", "ce"},
    "t2": {"t2", "t2w"},
    "flair": {"flair", "t2flair", "t2f", "t2wflair"},
}

# The convention nnU-Net's own BraTS 2021 conversion (Dataset137_BraTS21) writes, and that
# data_prep.export_nnunet writes: channels T1, T1ce, T2, FLAIR; labels 1 ED, 2 NCR, 3 ET, trained
# as the regions WT, TC, ET.
BRATS_CHANNEL_NAMES = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
BRATS_REGIONS_CLASS_ORDER = [1, 2, 3]


class DatasetError(Exception):
    """A dataset.json or an nnU-Net folder that cannot be used; the message names the file."""


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _subregion_of_label(name: str) -> str | None:
    """NCR, ED or ET for a plain label's name (MSD: "edema", "non-enhancing tumor", "enhancing
    tumour"; BraTS: "necrotic tumor core", "peritumoral edema", "GD-enhancing tumor"); None if
    the name says none of them."""
    k = _key(name)
    if k in ("ncr", "net", "ncrnet") or "necro" in k or "nonenhanc" in k:
        return "NCR"  # before "enhanc": a non-enhancing tumour is not the enhancing one
    if k in ("ed", "snfh") or "edema" in k or "oedema" in k:
        return "ED"
    if k == "et" or "enhanc" in k:
        return "ET"
    return None


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: str  # the DatasetXXX_Name folder
    file_ending: str
    num_channels: int
    channels: tuple | None  # the channel index of each of MODALITIES (None: read for its labels only)
    edition: Edition  # labels = the dataset's values for (bg, NCR, ED, ET)

    @property
    def json_path(self) -> str:
        return storage.join(self.root, DATASET_JSON)

    def channel_file(self, folder: str, case_id: str, channel: int) -> str:
        return storage.join(self.root, folder, f"{case_id}_{channel:0{CHANNEL_DIGITS}d}{self.file_ending}")

    def label_file(self, folder: str, case_id: str) -> str:
        return storage.join(self.root, folder, case_id + self.file_ending)

    def images(self, folder: str, case_id: str) -> tuple:
        """The case's channel files in MODALITIES order."""
        return tuple(self.channel_file(folder, case_id, self.channels[m]) for m in range(len(MODALITIES)))


def is_dataset(path: str) -> bool:
    """A folder with an nnU-Net v2 dataset.json (MSD's original dataset.json has "modality", not
    "channel_names", and is read as the MSD layout)."""
    path = storage.join(path, DATASET_JSON)
    if not storage.isfile(path):
        return False
    try:
        return "channel_names" in json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return True  # an nnU-Net folder with a damaged dataset.json: read_dataset names the problem


def dataset_root_of(path: str) -> str | None:
    """The dataset folder `path` is or lies in (a dataset, its imagesTr/imagesTs/labelsTr/labelsTs,
    or a file in one of those), or None."""
    path = storage.abspath(path)
    for candidate in (path, storage.dirname(path), storage.dirname(storage.dirname(path))):
        if storage.isdir(candidate) and is_dataset(candidate):
            return candidate
    return None


def _channels(names: dict, path: str, given) -> tuple:
    """The channel index of each of MODALITIES, from the given list (the modality of each channel
    in channel order) or else from channel_names."""
    order = sorted(names, key=int)
    if given is not None:
        given = [m.lower() for m in given]
        if sorted(given) != sorted(MODALITIES) or len(given) != len(order):
            raise DatasetError(f"--channels {' '.join(given)}: name each of {', '.join(MODALITIES)} once, in the "
                               f"order of the {len(order)} channels of {path}")
        return tuple(given.index(m) for m in MODALITIES)
    found = {}
    for ch in order:
        matches = [m for m, spellings in CHANNEL_NAMES.items() if _key(names[ch]) in spellings]
        if matches:
            found.setdefault(matches[0], []).append(int(ch))
    listing = ", ".join(f"{ch}: {names[ch]!r}" for ch in order)
    if len(order) != len(MODALITIES) or any(len(found.get(m, ())) != 1 for m in MODALITIES):
        raise DatasetError(f"{path}: channel_names {{{listing}}} are not recognisable as one each of T1, T1ce, T2 "
                           f"and FLAIR; pass --channels with the modality of each channel in order, e.g. "
                           f"--channels {' '.join(MODALITIES)}")
    return tuple(found[m][0] for m in MODALITIES)


def _as_values(v, path: str, name: str) -> tuple:
    values = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in values):
        raise DatasetError(f"{path}: label {name!r} = {v!r} is not a label value or a list of them")
    return values


def _plain_labels(labels: dict, path: str) -> dict:
    """{sub-region: value} from plain labels named like the sub-regions."""
    found, listing = {}, ", ".join(f"{n!r}: {v}" for n, v in labels.items())
    for name, values in labels.items():
        sub = _subregion_of_label(name)
        if sub is None or sub in found:
            raise DatasetError(f"{path}: labels {{{listing}}}: {name!r} is not recognisable as one of necrotic core "
                               "(NCR), oedema (ED) or enhancing tumour (ET)" if sub is None else
                               f"{path}: labels {{{listing}}}: two labels name {sub}")
        found[sub] = values[0]
    return found


def _region_labels(labels: dict, order, path: str) -> dict:
    """{sub-region: value} from nested regions: WT ⊃ TC ⊃ ET."""
    regions = sorted(((set(v), n) for n, v in labels.items()), key=lambda r: -len(r[0]))
    listing = ", ".join(f"{n!r}: {list(v)}" for n, v in labels.items())
    if len(regions) != 3 or not (regions[0][0] > regions[1][0] > regions[2][0]):
        raise DatasetError(f"{path}: region labels {{{listing}}} are not three nested regions (whole tumour ⊃ "
                           "tumour core ⊃ enhancing tumour)")
    wt, tc, et = (r[0] for r in regions)
    parts = {"ED": wt - tc, "NCR": tc - et, "ET": et}
    if any(len(v) != 1 for v in parts.values()):
        raise DatasetError(f"{path}: region labels {{{listing}}}: each of ED (WT without TC), NCR (TC without ET) "
                           "and ET needs exactly one label value")
    found = {sub: next(iter(v)) for sub, v in parts.items()}
    if order is None or len(order) != 3:
        raise DatasetError(f"{path}: region labels need regions_class_order with one value per region, got {order}")
    # nnU-Net writes region k's voxels as regions_class_order[k] (labels in dataset.json order);
    # reading its predictions with the labelsTr values needs the two to agree.
    names = [n for n in labels]
    written = {n: order[i] for i, n in enumerate(names)}
    expected = {regions[0][1]: found["ED"], regions[1][1]: found["NCR"], regions[2][1]: found["ET"]}
    if written != expected:
        raise DatasetError(f"{path}: regions_class_order {list(order)} writes {written}, but the labels' own "
                           f"values for those regions are {expected}")
    return found


def read_dataset(root: str, channels=None, labels_only: bool = False) -> Dataset:
    """The conventions of the nnU-Net dataset in `root`; `channels` (the modality of each channel,
    in channel order) replaces the reading of channel_names; `labels_only` skips the channels
    (Dataset.channels is then None). Raises DatasetError naming dataset.json and what in it cannot
    be used."""
    path = storage.join(root, DATASET_JSON)
    try:
        spec = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read it: {type(e).__name__}: {e}") from e
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in spec]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)} (an nnU-Net v2 dataset.json has channel_names, "
                           "labels, numTraining and file_ending)")
    file_ending = spec["file_ending"]
    if file_ending not in FILE_ENDINGS:
        raise DatasetError(f"{path}: file_ending {file_ending!r}: only NIfTI ({', '.join(FILE_ENDINGS)}) is read")
    labels = {n: _as_values(v, path, n) for n, v in spec["labels"].items()}
    background = [n for n, v in labels.items() if v == (0,)]
    if len(background) != 1:
        raise DatasetError(f"{path}: labels need exactly one background label with value 0, got {spec['labels']}")
    del labels[background[0]]
    # nnU-Net's own rule (LabelManager): a label listing several values makes the labels regions.
    region_based = any(len(v) > 1 for v in labels.values())
    found = (_region_labels(labels, spec.get("regions_class_order"), path) if region_based
             else _plain_labels(labels, path))
    if sorted(found) != sorted(("NCR", "ED", "ET")):
        raise DatasetError(f"{path}: labels {spec['labels']} do not define all of NCR, ED and ET")
    values = (0, found["NCR"], found["ED"], found["ET"])
    edition = Edition(f"nnU-Net {storage.basename(storage.abspath(root))}", "", {}, "", "", values)
    return Dataset(root, file_ending, len(spec["channel_names"]),
                   None if labels_only else _channels(spec["channel_names"], path, channels), edition)


def references(path: str) -> tuple[dict, dict]:
    """The label files of the dataset `path` is (labelsTr/ and labelsTs/) or of its labelsTr/ or
    labelsTs/ folder: ({case_id: (label file, Edition)}, {case_id: message} for the cases whose
    images are there but whose label file is not)."""
    root = dataset_root_of(path)
    ds = read_dataset(root, labels_only=True)
    if storage.abspath(path) == root:
        folders = [f for f in ("labelsTr", "labelsTs") if storage.isdir(storage.join(root, f))]
    else:
        folders = [storage.basename(storage.abspath(path))]
        if folders[0] not in ("labelsTr", "labelsTs"):
            raise DatasetError(f"{path}: give the nnU-Net dataset {root}, or its labelsTr/ or labelsTs/ folder")
    refs, unlabelled = {}, {}
    for folder in folders:
        for name in sorted(storage.listdir(storage.join(root, folder))):
            if name.endswith(ds.file_ending) and not name.startswith((".", "_")):
                refs[name[: -len(ds.file_ending)]] = (storage.join(root, folder, name), ds.edition)
        images = storage.join(root, "images" + folder[len("labels"):])
        for name in sorted(storage.listdir(images)) if storage.isdir(images) else []:
            parsed = split_channel_file(name, ds.file_ending)
            if parsed and parsed[0] not in refs and not name.startswith((".", "_")):
                unlabelled.setdefault(parsed[0], f"case {parsed[0]}: {storage.join(images, name)} has no label file "
                                                 f"{ds.label_file(folder, parsed[0])}")
    return refs, unlabelled


def brats_convention() -> Edition:
    """The label values of nnU-Net's BraTS conversion (1 ED, 2 NCR, 3 ET) as an Edition."""
    return Edition("nnU-Net BraTS", "", {}, "", "", (0, 2, 1, 3))


def split_channel_file(name: str, file_ending: str) -> tuple[str, int] | None:
    """CASE_0003<file_ending> -> ("CASE", 3); None for another name."""
    if not name.endswith(file_ending):
        return None
    m = re.fullmatch(rf"(.+)_(\d{{{CHANNEL_DIGITS}}})", name[: -len(file_ending)])
    return (m.group(1), int(m.group(2))) if m else None


def brats_dataset_json(num_training: int, name: str) -> dict:
    """dataset.json of a BraTS set written in nnU-Net's BraTS convention."""
    return {"name": name, "channel_names": BRATS_CHANNEL_NAMES, "labels": BRATS_LABELS,
            "regions_class_order": BRATS_REGIONS_CLASS_ORDER, "numTraining": num_training, "file_ending": ".nii.gz",
            "description": "BraTS-layout cases written by data_prep.export_nnunet (channels T1, T1ce, T2, FLAIR; "
                           "labels 1 edema, 2 necrotic core, 3 enhancing tumour, as nnU-Net's BraTS conversion)"}
