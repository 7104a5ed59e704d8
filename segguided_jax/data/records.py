"""The record schema of the shards, the manifest beside them, and the way back to a case's
original grid.

A record is one case: `np.savez` bytes (no pickle) with
  image  (X, Y, Z, 4) float32, z-scored per modality inside the brain, 0 outside, MODALITIES order;
  label  (X, Y, Z) uint8 internal labels 0..3 (absent for prediction-only cases);
  case_id  str.
(X, Y, Z) is the case's brain box, cropped from the original grid (`crop_box` in the manifest).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np

from segguided_jax.data.brats import ALL_EDITIONS

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def encode_case(case_id: str, image: np.ndarray, label: np.ndarray | None) -> bytes:
    buf = io.BytesIO()
    arrays = {"image": image.astype(np.float32), "case_id": np.array(case_id)}
    if label is not None:
        arrays["label"] = label.astype(np.uint8)
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_case(record: bytes) -> dict:
    with np.load(io.BytesIO(record), allow_pickle=False) as z:
        out = {"image": z["image"], "case_id": str(z["case_id"])}
        if "label" in z:
            out["label"] = z["label"]
    return out


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m data_prep.convert --src ... --out {data_dir}` first")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    return manifest


def shard_paths(data_dir: str, manifest: dict) -> list[str]:
    return [os.path.join(data_dir, s) for s in manifest["shards"]]


class CaseSource(Sequence):
    """Random access to the decoded cases of one part ("train" or "val") of a split ("holdout",
    "fold0", ...; see data_prep.splits): a Grain-compatible data source."""

    def __init__(self, data_dir: str, part: str, split: str = "holdout", manifest: dict | None = None):
        from grain.sources import ArrayRecordDataSource  # array_record is heavy; import on use

        self.manifest = manifest or load_manifest(data_dir)
        with open(os.path.join(data_dir, "splits.json")) as f:
            splits = json.load(f)
        if split not in splits:
            raise ValueError(f"{data_dir}/splits.json has no split {split!r}; it has "
                             f"{[k for k, v in splits.items() if isinstance(v, dict)]}")
        by_id = {c["id"]: c for c in self.manifest["cases"]}
        self.cases = [by_id[i] for i in splits[split][part]]
        if not self.cases:
            raise ValueError(f"{data_dir}: no cases in the {part!r} part of split {split!r}")
        self._source = ArrayRecordDataSource(shard_paths(data_dir, self.manifest))

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        return decode_case(self._source[self.cases[i]["record"]])


def to_original_grid(label: np.ndarray, case: dict, edition: str) -> np.ndarray:
    """Internal labels on the case's preprocessed grid -> the edition's label values on the
    original grid (zeros outside the crop box). The exact inverse of the conversion's crop and
    label map; when the conversion resampled, labels go back by nearest neighbour."""
    out = np.zeros(case["orig_shape"], np.uint8)
    box = tuple(slice(lo, hi) for lo, hi in case["crop_box"])
    if tuple(label.shape) != tuple(case["shape"]):
        raise ValueError(f"case {case['id']}: label shape {label.shape}, expected {tuple(case['shape'])}")
    crop_shape = out[box].shape
    if label.shape != crop_shape:
        from scipy import ndimage

        factors = [c / s for c, s in zip(crop_shape, label.shape)]
        label = ndimage.zoom(label, factors, order=0, mode="nearest", grid_mode=True)
    out[box] = ALL_EDITIONS[edition].from_internal(label)
    return out
