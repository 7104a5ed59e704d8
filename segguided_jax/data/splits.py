"""The train / val / test protocol, drawn once from a seed and written beside the shards (splits.json).

- `test`: held out (the paper held out 251 of 1,251 cases). Never read by training, validation or
  checkpoint selection; sweeps and reported numbers are computed on it.
- "holdout": `val` (validation during training, best/ and post-processing are chosen on it) is drawn
  from the non-test cases, `train` is the rest.
- "fold0" … "fold{k-1}": k-fold cross-validation inside the non-test cases (fold k validates on
  its k-th part and trains on the others); every fold shares the same `test`.
Only labelled cases take part; prediction-only cases are listed under "predict".
"""
from __future__ import annotations

import json

import numpy as np

from segguided_jax.io import storage

SPLITS = "splits.json"
SPLITS_VERSION = 2
PARTS = ("train", "val", "test")


def make_splits(labelled: list[str], unlabelled: list[str], *, test_cases: int, val_cases: int, folds: int,
                seed: int) -> dict:
    ids = sorted(labelled)
    if not 0 <= test_cases < len(ids):
        raise ValueError(f"cannot hold out {test_cases} test cases of {len(ids)} labelled cases")
    if not 0 <= val_cases < len(ids) - test_cases:
        raise ValueError(f"cannot draw {val_cases} validation cases from the {len(ids) - test_cases} non-test cases")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    test, rest = sorted(order[:test_cases]), order[test_cases:]
    splits = {"version": SPLITS_VERSION, "seed": seed, "test_cases": test_cases, "val_cases": val_cases,
              "folds": folds, "predict": sorted(unlabelled),
              "holdout": {"train": sorted(rest[val_cases:]), "val": sorted(rest[:val_cases]), "test": test}}
    if folds > 1:
        parts = np.array_split(np.array(rest, dtype=object), folds)
        for k in range(folds):
            splits[f"fold{k}"] = {"train": sorted(c for j, p in enumerate(parts) if j != k for c in p),
                                  "val": sorted(parts[k].tolist()), "test": test}
    return splits


def _write(path: str, splits: dict) -> None:
    storage.write_text(path, json.dumps(splits, indent=1))  # atomic: whole or absent


def write_or_check(out: str, labelled: list[str], unlabelled: list[str], **settings) -> dict:
    """Writes splits.json, or, if it exists, checks it is the one these settings give and reuses
    it: a split is never silently redrawn."""
    path = storage.join(out, SPLITS)
    splits = make_splits(labelled, unlabelled, **settings)
    if storage.exists(path):
        existing = json.loads(storage.read_text(path))
        if existing != splits:
            raise ValueError(f"{path} holds splits drawn with other settings or cases (seed "
                             f"{existing.get('seed')}, {existing.get('test_cases', existing.get('val_cases'))} test "
                             f"cases, {existing.get('folds')} folds); delete it to draw new ones")
        return existing
    _write(path, splits)
    return splits


def load_splits(data_dir: str) -> dict:
    """splits.json of a prepared folder; a folder split by an older version (whose `val` part was
    the held-out test set) is refused with the way to re-split it."""
    path = storage.join(data_dir, SPLITS)
    try:
        splits = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run `python -m data_prep.convert --src ... --out {data_dir}`") from None
    if splits.get("version") != SPLITS_VERSION:
        raise ValueError(
            f"{path} was written by an older version, whose `val` part was the held-out test set (so training "
            f"validated and chose best/ on test cases). Re-split: delete {path} and run the same "
            f"`python -m data_prep.convert --src ... --out {data_dir}` again (finished shards are reused; only "
            "the split is drawn, now with separate val and test parts).")
    return splits


def split_ids(data_dir: str, split: str, part: str) -> list[str]:
    """The case ids of one part ("train", "val" or "test") of one split ("holdout", "fold0", ...)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; one of {PARTS}")
    splits = load_splits(data_dir)
    if split not in splits or not isinstance(splits[split], dict):
        raise ValueError(f"{data_dir}/{SPLITS} has no split {split!r}; it has "
                         f"{[k for k, v in splits.items() if isinstance(v, dict)]}")
    return list(splits[split][part])
