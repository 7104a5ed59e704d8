"""3D transforms on channels-last numpy cases: {"image": (X, Y, Z, C), "label": (X, Y, Z)}.
Each takes its random numbers from the Generator it is given (Grain derives one per record from
the pipeline seed and the record's index), never from global state."""
from __future__ import annotations

import numpy as np

from segguided_jax.data.augment import augment


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


def train_transform(case: dict, rng: np.random.Generator, data_cfg) -> dict:
    """Crop a patch, then augment it (data_cfg.augment; see segguided_jax.data.augment)."""
    case = random_crop(case, data_cfg.patch, data_cfg.foreground_fraction, rng)
    image, label = augment(case["image"], case["label"], rng, data_cfg.augment)
    return {"image": image, "label": label.astype(np.uint8, copy=False)}
