"""BraTS editions: folder and file naming, label values, and the regions built from labels.

Internal label scheme (used in shards, training and inference): 0 background, 1 NCR (necrotic
core), 2 ED (peritumoral oedema), 3 ET (enhancing tumour). Regions: ET = {3}; TC = {1, 3};
WT = {1, 2, 3}.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

# Internal order of the image channels; every edition's files are read into this order.
MODALITIES = ("t1", "t1ce", "t2", "flair")
SUBREGIONS = ("NCR", "ED", "ET")  # internal labels 1, 2, 3: the attention maps' order
REGIONS = ("ET", "TC", "WT")  # the sigmoid head's channel order
# Internal labels in each region.
REGION_LABELS = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}


@dataclasses.dataclass(frozen=True)
class Edition:
    name: str
    case_pattern: str  # regex a case folder's name matches
    suffixes: dict  # internal modality -> file suffix
    seg_suffix: str
    separator: str  # between the case id and the suffix in file names
    labels: tuple  # the edition's label values for (bg, NCR, ED, ET)

    def file_name(self, case_id: str, suffix: str) -> str:
        return f"{case_id}{self.separator}{suffix}.nii.gz"

    def modality_files(self, case_dir: str) -> dict:
        case_id = os.path.basename(os.path.normpath(case_dir))
        return {m: os.path.join(case_dir, self.file_name(case_id, s)) for m, s in self.suffixes.items()}

    def seg_file(self, case_dir: str) -> str:
        case_id = os.path.basename(os.path.normpath(case_dir))
        return os.path.join(case_dir, self.file_name(case_id, self.seg_suffix))

    def to_internal(self, seg: np.ndarray) -> np.ndarray:
        """Edition label values -> internal 0..3 (uint8). Values must already be validated."""
        lut = np.zeros(max(self.labels) + 1, np.uint8)
        lut[list(self.labels)] = np.arange(4, dtype=np.uint8)
        return lut[seg]

    def from_internal(self, labels: np.ndarray) -> np.ndarray:
        """Internal 0..3 -> the edition's label values (uint8)."""
        return np.asarray(self.labels, np.uint8)[labels]


EDITIONS = {
    "2021": Edition("2021", r"^BraTS2021_\d{5}$",
                    {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "seg", "_", (0, 1, 2, 4)),
    "2023": Edition("2023", r"^BraTS-GLI-\d{5}-\d{3}$",
                    {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, "seg", "-", (0, 1, 2, 3)),
}

# Medical Segmentation Decathlon Task01_BrainTumour: imagesTr/BRATS_NNN.nii.gz are 4D volumes with
# the modalities in the order FLAIR, T1w, T1gd, T2w along the last axis; labelsTr/BRATS_NNN.nii.gz
# use 0 background, 1 oedema, 2 non-enhancing tumour (our NCR), 3 enhancing tumour.
MSD = Edition("msd", r"^BRATS_\d{3}$", {}, "", "", (0, 2, 1, 3))
MSD_CHANNELS = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
ALL_EDITIONS = {**EDITIONS, "msd": MSD}


def case_id_for(edition: str, index: int) -> str:
    return f"BraTS2021_{index:05d}" if edition == "2021" else f"BraTS-GLI-{index:05d}-000"


def detect_edition(case_name: str) -> Edition | None:
    for edition in EDITIONS.values():
        if re.match(edition.case_pattern, case_name):
            return edition
    return None


def labels_to_regions(labels):
    """Internal labels (...,) int -> region masks (..., 3) in REGIONS order, in the input's array
    library (numpy or jax.numpy: both implement the array API's __array_namespace__)."""
    xp = labels.__array_namespace__()
    return xp.stack([labels == 3, (labels == 1) | (labels == 3), labels > 0], axis=-1)


def labels_to_subregions(labels):
    """Internal labels (...,) int -> one-hot sub-region masks (..., 3) in SUBREGIONS order."""
    xp = labels.__array_namespace__()
    return xp.stack([labels == 1, labels == 2, labels == 3], axis=-1)


def regions_to_labels(regions: np.ndarray) -> np.ndarray:
    """Binary region masks (..., 3) in REGIONS order -> internal labels, nesting enforced the
    nnU-Net way: WT without TC is ED, TC without ET is NCR, ET is ET."""
    labels = np.zeros(regions.shape[:-1], np.uint8)
    labels[regions[..., 2]] = 2
    labels[regions[..., 1]] = 1
    labels[regions[..., 0]] = 3
    return labels
