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

from segguided_jax.data.augment_plan import AugmentPlan
from segguided_jax.data.records import CaseSource
from segguided_jax.data.transforms import enlarged_crop, foreground_rows, train_patch

_RNG_TAG = 0x5E6  # keeps these streams apart from other uses of the same seed


def train_dataset(data_dir: str, data_cfg, *, seed: int, batch_size: int,
                  plan: AugmentPlan | None = None) -> grain.IterDataset:
    """Batches for this process (batch_size is the per-process batch), as `plan` says (default: the
    plan of data_cfg; the train step's, ShardedSteps.plan, where there is one). On the host path:
      image    (B, P, P, P, C) float32 augmented patches (P = data.patch);
      label    (B, P, P, P) uint8;
      case_id  (B,) numpy str: which case each row comes from (not for the device: strip it);
    or on the device path, for segguided_jax.data.device_augment.augment_boxes (through
    sharding.global_batch, which puts each row's box in a slot of its own on the devices):
      image    (N, C) data.device_crop_dtype, label (N,) uint8: rows' boxes, flattened, one after
               another (of each row only the part of its enlarged crop that its draws can read);
      box      (B, 7) int32: each row's offset into image and label, its box's lower corner in
               the enlarged crop and its edges;
      norm     (B, C, 2) float32: each row's (mean, std) per channel;
      augment  (B, A) float32: each row's packed random draws (device_augment.draw, drawn as the
               CPU path draws them);
      case_id  as above.
    """
    if batch_size < 1 or data_cfg.patches_per_case < 1:
        raise ValueError(f"batch_size {batch_size} and data.patches_per_case {data_cfg.patches_per_case} "
                         "must be positive")
    data_cfg = data_cfg.copy_and_resolve_references()  # later changes to the caller's config do not leak in
    plan = AugmentPlan.from_data(data_cfg) if plan is None else plan
    source = CaseSource(data_dir, "train", data_cfg.split)
    ds = grain.MapDataset.source(_LazyCases(source))
    if jax.process_count() > 1:
        ds = ds[jax.process_index():: jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
    ds = ds.map_with_index(functools.partial(
        make_group, data_cfg=data_cfg, plan=plan, seed=seed, process=jax.process_index()))
    # Small read-ahead: each element is patches_per_case batches.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                                 prefetch_buffer_size=data_cfg.prefetch))
    if data_cfg.num_workers > 0:
        # Grain's workers read absl flags of their own: the train command parses them; called from
        # a notebook or a test, unparsed flags would stop the first worker.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return grain.experimental.FlatMapIterDataset(it_ds, _SplitGroup(data_cfg.patches_per_case, plan.shared_keys))


def make_group(index: int, cases: list, *, data_cfg, plan: AugmentPlan, seed: int, process: int = 0) -> dict:
    """Group `index` of B decoded cases -> patches_per_case (K) batches. Row i of every batch comes
    from cases[i]; the last foreground_rows(B, data.foreground_fraction) rows of each batch are
    forced onto foreground. Returns, stacked over the K batches:
      host path (plan.on_device False): {"image": (K, B, P, P, P, C) float32, "label": (K, B, P,
      P, P) uint8, "case_id": (K, B) str};
      device path (transforms.enlarged_crop per row): {"image": (N, C) and "label": (N,)
      the K * B rows' boxes one after another, shared by the K batches; "box": (K, B, 7) int32,
      each row's offset into them, then its box; "norm": (K, B, C, 2); "augment": (K, B, A);
      "case_id": (K, B)}."""
    k, b = int(data_cfg.patches_per_case), len(cases)
    forced = foreground_rows(b, data_cfg.foreground_fraction)
    case_ids = np.array([[c.case_id for c in cases]] * k)
    rngs = [[np.random.default_rng((_RNG_TAG, seed, process, index, j, i)) for i in range(b)] for j in range(k)]
    if plan.on_device:
        rows = [[enlarged_crop(case, rngs[j][i], data_cfg, force_foreground=i >= b - forced)
                 for i, case in enumerate(cases)] for j in range(k)]
        sizes = np.array([[len(r["label"]) for r in batch] for batch in rows], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).reshape(k, b)
        flat = [r for batch in rows for r in batch]
        return {"image": np.concatenate([r["image"] for r in flat]),
                "label": np.concatenate([r["label"] for r in flat]),
                "box": np.concatenate([offsets[..., None], [[r["box"] for r in batch] for batch in rows]],
                                      axis=-1).astype(np.int32),
                "norm": np.array([[r["norm"] for r in batch] for batch in rows], np.float32),
                "augment": np.array([[r["augment"] for r in batch] for batch in rows], np.float32),
                "case_id": case_ids}
    images = np.empty((k, b) + plan.patch + (cases[0].channels,), np.float32)
    labels = np.empty((k, b) + plan.patch, np.uint8)
    for j in range(k):
        for i, case in enumerate(cases):
            sample = train_patch(case, rngs[j][i], data_cfg, force_foreground=i >= b - forced, out=images[j, i])
            labels[j, i] = sample["label"]
    return {"image": images, "label": labels, "case_id": case_ids}


class _LazyCases(Sequence):
    """A CaseSource whose items are records.Case (normalised box by box), not whole float32 images."""

    def __init__(self, source: CaseSource):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source.case(i)


class _SplitGroup(grain.experimental.FlatMapTransform):
    """A group of K stacked batches -> the K batches, in order. The keys in `shared` (the boxes
    of the device path: AugmentPlan.shared_keys) are the group's whole arrays, which every batch takes along: the rows'
    offsets index into them, and only the rows' own bytes go on to the device."""

    def __init__(self, k: int, shared=()):
        self.max_fan_out = int(k)
        self.shared = tuple(shared)

    def flat_map(self, element):
        return [{key: value if key in self.shared else value[j] for key, value in element.items()}
                for j in range(self.max_fan_out)]
