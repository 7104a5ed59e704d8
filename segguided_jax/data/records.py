"""The record schema of the shards, the manifest beside them, and a source of decoded cases.

A record is one case: `np.savez` bytes (no pickle) with
  image  (X, Y, Z, 4) float32, z-scored per modality inside the brain, 0 outside, MODALITIES order;
  label  (X, Y, Z) uint8 internal labels 0..3 (absent for prediction-only cases);
  case_id  str.
(X, Y, Z) is the case's brain box, cropped from the original grid (`crop_box` in the manifest);
segguided_jax.data.preprocess.to_original_grid goes back.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np

from segguided_jax.data.splits import split_ids

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
    """Random access to the decoded cases of one part ("train", "val" or "test") of a split
    ("holdout", "fold0", ...; see segguided_jax.data.splits): a Grain-compatible data source."""

    def __init__(self, data_dir: str, part: str, split: str = "holdout", manifest: dict | None = None):
        from grain.sources import ArrayRecordDataSource  # array_record is heavy; import on use

        self.manifest = manifest or load_manifest(data_dir)
        by_id = {c["id"]: c for c in self.manifest["cases"]}
        self.cases = [by_id[i] for i in split_ids(data_dir, split, part)]
        if not self.cases:
            raise ValueError(f"{data_dir}: no cases in the {part!r} part of split {split!r}")
        self._source = ArrayRecordDataSource(shard_paths(data_dir, self.manifest))

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        return decode_case(self._source[self.cases[i]["record"]])
