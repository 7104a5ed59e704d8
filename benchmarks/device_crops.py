"""What data.augment_on_device ships per batch: of each row's enlarged crop only the box its
draws can read, as the records store it (int16 raw intensities, normalised on the device),
against the whole enlarged crop as float32 (what the pipeline shipped before; its bytes follow
from the shapes). Host CPU per batch of both, and the host -> device placement time of both on
this machine's default device.

    python -m data_prep.synthetic --out DIR/raw --cases 4 --workers 2      # full size 240 x 240 x 155
    python -m data_prep.convert --src DIR/raw --out DIR/prepared
    python benchmarks/device_crops.py --prepared DIR/prepared [--config configs/brats21.py] [--batches 24]
        [--dtype int16|float32]

The pipeline runs in this process (no Grain workers), so CPU seconds per batch are one core's.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from segguided_jax.parallel import sharding  # noqa: E402
from segguided_jax.data.augment import initial_patch_size  # noqa: E402
from segguided_jax.data.device_augment import draws_size  # noqa: E402
from segguided_jax.data.pipeline import train_dataset  # noqa: E402
from segguided_jax.data.records import CaseSource  # noqa: E402
from segguided_jax.data.transforms import enlarged_start  # noqa: E402
from segguided_jax.training.steps import batch_shardings  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def whole_crops(source: CaseSource, rows: int, patch, initial, rng) -> dict:
    """The format shipped before: whole enlarged crops normalised to float32 (B, I, I, I, C)."""
    images, labels = [], []
    for i in range(rows):
        case = source.case(int(rng.integers(len(source))))
        start = enlarged_start(case.shape, patch, initial, rng)
        lo, hi = np.maximum(start, 0), np.minimum(start + np.asarray(initial), case.shape)
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        image = np.zeros(tuple(initial) + (case.channels,), np.float32)
        image[inner] = np.moveaxis(np.stack(case.channel_boxes(lo, hi)), 0, -1)
        label = np.zeros(tuple(initial), np.uint8)
        label[inner] = case.label[tuple(slice(a, b) for a, b in zip(lo, hi))]
        images.append(image)
        labels.append(label)
    return {"image": np.stack(images), "label": np.stack(labels)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--config", default="configs/brats21.py")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--dtype", default="int16", choices=("int16", "float32"))
    args = parser.parse_args()
    config = load_config(args.config)
    config.data.dir, config.data.num_workers = args.prepared, 0
    config.data.augment_on_device, config.data.device_crop_dtype = True, args.dtype
    patch = tuple(int(p) for p in config.data.patch)
    initial = initial_patch_size(patch, config.data.augment)
    rows, channels = config.train.batch_size, config.model.in_channels
    before = rows * math.prod(initial) * (channels * 4 + 1) + rows * draws_size(channels) * 4
    mesh = sharding.make_mesh(config.mesh)
    shardings = batch_shardings(config, mesh)
    print(f"{args.config}: batch {rows} x patch {patch}, enlarged crop {initial}; {config.data.patches_per_case} "
          f"patches per case; device {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)

    it = iter(train_dataset(config.data.dir, config.data, seed=0, batch_size=rows))
    shipped, cpu, place, fill = [], [], [], []
    for i in range(args.batches + 1):
        t = time.process_time()
        batch = next(it)
        spent = time.process_time() - t
        batch.pop("case_id")
        nbytes = sum(v.nbytes for k, v in batch.items() if k not in ("image", "label"))
        lengths = np.prod(batch["box"][:, 4:7], axis=1)
        nbytes += int(lengths.sum()) * (batch["image"].dtype.itemsize * channels + 1)
        t = time.perf_counter()
        jax.block_until_ready(sharding.global_batch(batch, mesh, shardings))
        if i:  # the first batch compiles the placement programs
            cpu.append(spent)
            shipped.append(nbytes)
            place.append(time.perf_counter() - t)
            fill.extend(lengths / math.prod(initial))

    source = CaseSource(config.data.dir, "train", config.data.split)
    rng = np.random.default_rng(0)
    old_cpu, old_place = [], []
    for i in range(min(args.batches, 8) + 1):
        t = time.process_time()
        old = whole_crops(source, rows, patch, initial, rng)
        spent = time.process_time() - t
        t = time.perf_counter()
        jax.block_until_ready(sharding.global_batch(old, mesh, {"image": sharding.rows_sharding(mesh),
                                                                "label": sharding.rows_sharding(mesh)}))
        if i:
            old_cpu.append(spent)
            old_place.append(time.perf_counter() - t)

    mib = 2 ** 20
    print(f"before, whole float32 crops: {before / mib:8.1f} MiB per batch (from the shapes) | host CPU for the crops "
          f"alone {np.mean(old_cpu):.3f} s per batch (whole crops cut and normalised, {len(old_cpu)} batches) | "
          f"placement {np.mean(old_place) * 1e3:.1f} ms")
    print(f"now, {args.dtype} boxes:          {np.mean(shipped) / mib:8.1f} MiB per batch (mean of {len(shipped)}; "
          f"max {max(shipped) / mib:.1f}) = {np.mean(shipped) / before:.3f} of before (max {max(shipped) / before:.3f}) "
          f"| host CPU {np.mean(cpu):.3f} s per batch (reading, placing, drawing, cutting) | placement "
          f"{np.mean(place) * 1e3:.1f} ms")
    print(f"box voxels / crop voxels per row: mean {np.mean(fill):.3f}, median {np.median(fill):.3f}, max {np.max(fill):.3f}")


if __name__ == "__main__":
    main()
