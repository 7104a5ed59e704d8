"""Train/validation splits, drawn once from a seed and written beside the shards (splits.json).

- "holdout": `val` is a held-out set (the paper held out 251 of 1,251 cases), `train` the rest.
- "fold0" … "fold{k-1}": k-fold cross-validation inside the hold-out's training part, so the
  held-out cases stay unseen by every fold.
Only labelled cases take part; prediction-only cases are listed under "predict".
"""
from __future__ import annotations

import json
import os

import numpy as np

SPLITS = "splits.json"


def make_splits(labelled: list[str], unlabelled: list[str], *, val_cases: int, folds: int, seed: int) -> dict:
    ids = sorted(labelled)
    if not 0 <= val_cases < len(ids):
        raise ValueError(f"cannot hold out {val_cases} of {len(ids)} labelled cases")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    val, train = sorted(order[:val_cases]), order[val_cases:]
    splits = {"seed": seed, "val_cases": val_cases, "folds": folds, "predict": sorted(unlabelled),
              "holdout": {"train": sorted(train), "val": val}}
    if folds > 1:
        parts = np.array_split(np.array(train, dtype=object), folds)
        for k in range(folds):
            splits[f"fold{k}"] = {"train": sorted(c for j, p in enumerate(parts) if j != k for c in p),
                                  "val": sorted(parts[k].tolist())}
    return splits


def write_or_check(out: str, labelled: list[str], unlabelled: list[str], *, val_cases: int, folds: int,
                   seed: int) -> dict:
    """Writes splits.json, or, if it exists, checks it is the one these settings give and reuses
    it: a split is never silently redrawn."""
    path = os.path.join(out, SPLITS)
    splits = make_splits(labelled, unlabelled, val_cases=val_cases, folds=folds, seed=seed)
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != splits:
            raise ValueError(f"{path} holds splits drawn with other settings or cases (seed "
                             f"{existing.get('seed')}, {existing.get('val_cases')} held out, "
                             f"{existing.get('folds')} folds); delete it to draw new ones")
        return existing
    with open(path + ".tmp", "w") as f:
        json.dump(splits, f, indent=1)
    os.replace(path + ".tmp", path)
    return splits


def load_splits(data_dir: str) -> dict:
    with open(os.path.join(data_dir, SPLITS)) as f:
        return json.load(f)
