"""The Grain training pipeline over the converted shards.

Order: cases of the train split -> this process's share -> shuffle (a new order every epoch) ->
repeat forever -> groups of B consecutive cases (B = the per-process batch) -> each group decoded
once and cut into `data.patches_per_case` batches (segguided_jax.data.transforms: nnU-Net's
placement with foreground oversampling, then augmentation) -> [worker processes] -> the batches
one by one. A batch therefore holds B different cases, as nnU-Net's, and each decoded case
serves `patches_per_case` consecutive batches, which divides the cost of reading and decoding a
whole case by that number.

Random numbers: row i of batch j of group g draws from np.random.default_rng((tag, seed,
process index, g, j, i)): from the seed and the position in the stream only. Everything up to the
group is a MapDataset and the split into batches is Grain's FlatMapIterDataset, whose state is the
group's position and the index inside it, so saving and restoring an iterator's state gives
exactly the batches that would have come next.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import jax
import numpy as np

from segguided_jax.data.augment import initial_patch_size
from segguided_jax.data.device_augment import draws_size
from segguided_jax.data.records import CaseSource
from segguided_jax.data.transforms import enlarged_crop, foreground_rows, train_patch

_RNG_TAG = 0x5E6  # keeps these streams apart from other uses of the same seed


def train_dataset(data_dir: str, data_cfg, *, seed: int, batch_size: int) -> grain.IterDataset:
    """Batches for this process (batch_size is the per-process batch):
      image    (B, P, P, P, C) float32 augmented patches (P = data.patch), or with
               data.augment_on_device the enlarged crops (B, I, I, I, C), I =
               augment.initial_patch_size, for segguided_jax.data.device_augment.augment_batch;
      label    (B, P, P, P) uint8 (or (B, I, I, I));
      augment  with data.augment_on_device only: (B, A) float32, each row's packed random draws
               (device_augment.draw, drawn as the CPU path draws them);
      case_id  (B,) numpy str: which case each row comes from (not for the device: strip it).
    """
    if batch_size < 1 or data_cfg.patches_per_case < 1:
        raise ValueError(f"batch_size {batch_size} and data.patches_per_case {data_cfg.patches_per_case} "
                         "must be positive")
    data_cfg = data_cfg.copy_and_resolve_references()  # later changes to the caller's config do not leak in
    source = CaseSource(data_dir, "train", data_cfg.split)
    ds = grain.MapDataset.source(_LazyCases(source))
    if jax.process_count() > 1:
        ds = ds[jax.process_index():: jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
    ds = ds.map_with_index(functools.partial(
        make_group, data_cfg=data_cfg, seed=seed, process=jax.process_index()))
    # Small read-ahead: each element is patches_per_case batches.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                                 prefetch_buffer_size=data_cfg.prefetch))
    if data_cfg.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return grain.experimental.FlatMapIterDataset(it_ds, _SplitGroup(data_cfg.patches_per_case))


def make_group(index: int, cases: list, *, data_cfg, seed: int, process: int = 0) -> dict:
    """Group `index` of B decoded cases -> patches_per_case batches, stacked:
    {"image": (K, B, ...) float32, "label": (K, B, ...) uint8, ["augment": (K, B, A) float32,]
    "case_id": (K, B) str}. Row i of
    every batch comes from cases[i]; the last foreground_rows(B, data.foreground_fraction) rows of
    each batch are forced onto foreground."""
    k, b = int(data_cfg.patches_per_case), len(cases)
    forced = foreground_rows(b, data_cfg.foreground_fraction)
    cut = enlarged_crop if data_cfg.augment_on_device else train_patch
    size = initial_patch_size(data_cfg.patch, data_cfg.augment) if data_cfg.augment_on_device else data_cfg.patch
    size = tuple(int(s) for s in size)
    images = np.empty((k, b) + size + (cases[0].channels,), np.float32)
    labels = np.empty((k, b) + size, np.uint8)
    draws = np.empty((k, b, draws_size(cases[0].channels)), np.float32)
    for j in range(k):
        for i, case in enumerate(cases):
            rng = np.random.default_rng((_RNG_TAG, seed, process, index, j, i))
            sample = cut(case, rng, data_cfg, force_foreground=i >= b - forced, out=images[j, i])
            labels[j, i] = sample["label"]
            if data_cfg.augment_on_device:
                draws[j, i] = sample["augment"]
    case_ids = np.array([[c.case_id for c in cases]] * k)
    group = {"image": images, "label": labels, "case_id": case_ids}
    if data_cfg.augment_on_device:
        group["augment"] = draws
    return group


class _LazyCases(Sequence):
    """A CaseSource whose items are records.Case (normalised box by box), not whole float32 images."""

    def __init__(self, source: CaseSource):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source.case(i)


class _SplitGroup(grain.experimental.FlatMapTransform):
    """A group of K stacked batches -> the K batches, in order."""

    def __init__(self, k: int):
        self.max_fan_out = int(k)

    def flat_map(self, element):
        return [{key: value[j] for key, value in element.items()} for j in range(self.max_fan_out)]
