"""The Grain training pipeline over the converted shards.

Order: cases of the train split -> this process's share -> shuffle (a new order every epoch) ->
repeat forever -> crop and flip (random numbers from (seed, position in the stream)) -> batch.
Everything is a MapDataset until the end, so an iterator's state is a position: saving and
restoring it gives back exactly the batches that would have come next.
"""
from __future__ import annotations

import functools

import grain
import jax

from segguided_jax.data.records import CaseSource
from segguided_jax.data.transforms import train_transform


def train_dataset(data_dir: str, data_cfg, *, seed: int, batch_size: int) -> grain.IterDataset:
    """Batches of {"image": (B, P, P, P, 4) float32, "label": (B, P, P, P) uint8} for this
    process (batch_size is the per-process batch)."""
    ds = grain.MapDataset.source(CaseSource(data_dir, "train", data_cfg.split))
    if jax.process_count() > 1:
        ds = ds[jax.process_index():: jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.random_map(functools.partial(_transform, data_cfg=data_cfg), seed=seed + 1)
    ds = ds.batch(batch_size, drop_remainder=True)
    # Small read-ahead: each element is a whole decoded case until it is cropped.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                                 prefetch_buffer_size=data_cfg.prefetch))
    if data_cfg.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return it_ds


def _transform(case, rng, data_cfg):
    return train_transform(case, rng, data_cfg)
