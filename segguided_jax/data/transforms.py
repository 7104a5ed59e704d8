"""3D transforms on channels-last numpy cases: {"image": (X, Y, Z, C), "label": (X, Y, Z)}.
Each takes its random numbers from the Generator it is given (Grain derives one per record from
the pipeline seed and the record's index), never from global state."""
from __future__ import annotations

import numpy as np


def random_crop(case: dict, patch, foreground_fraction: float, rng: np.random.Generator) -> dict:
    """A patch-sized crop. With probability foreground_fraction it is centred on a random tumour
    voxel (when the case has one), otherwise placed uniformly. Dims smaller than the patch are
    zero-padded (label 0)."""
    image, label = case["image"], case["label"]
    patch = tuple(int(p) for p in patch)
    pad = [(0, max(p - s, 0)) for s, p in zip(label.shape, patch)]
    if any(p[1] for p in pad):
        image = np.pad(image, pad + [(0, 0)])
        label = np.pad(label, pad)
    shape = label.shape
    if rng.random() < foreground_fraction and (fg := np.flatnonzero(label)).size:
        centre = np.unravel_index(fg[rng.integers(fg.size)], shape)
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return {"image": image[sl], "label": label[sl]}


def random_flip(case: dict, probability: float, rng: np.random.Generator) -> dict:
    """Mirrors each spatial axis independently with the given probability."""
    axes = tuple(a for a in range(3) if rng.random() < probability)
    if not axes:
        return case
    return {"image": np.flip(case["image"], axes), "label": np.flip(case["label"], axes)}


def train_transform(case: dict, rng: np.random.Generator, data_cfg) -> dict:
    case = random_crop(case, data_cfg.patch, data_cfg.foreground_fraction, rng)
    case = random_flip(case, data_cfg.flip_probability, rng)
    return {"image": np.ascontiguousarray(case["image"], np.float32),
            "label": np.ascontiguousarray(case["label"], np.uint8)}
