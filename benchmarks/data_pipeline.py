"""Conversion and input-pipeline throughput on full-size cases.

    python benchmarks/data_pipeline.py --raw DIR [--prepared DIR] [--convert-workers 1]
        [--batches 20] [--pipeline-workers 0,1,2] [--config configs/brats21.py]

Converts the BraTS-layout cases in --raw (prints seconds per case), then runs the training
pipeline of the config (128³ patches, batch size and augmentation from it) over the result with
0, 1 and 2 Grain worker processes and prints patches/s for each, plus the peak resident memory of
this process and of its worker processes. Make full-size cases with
`python -m data_prep.synthetic --out DIR --cases 20`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import time


def _config(path):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--prepared", default=None, help="default: a fresh folder beside --raw")
    parser.add_argument("--convert-workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--pipeline-workers", default="0,1,2")
    parser.add_argument("--config", default="configs/brats21.py")
    args = parser.parse_args()
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags; this script has none

    from data_prep.convert import convert
    from segguided_jax.data.pipeline import train_dataset

    prepared = args.prepared or os.path.normpath(args.raw) + "-prepared-bench"
    if os.path.exists(prepared):
        shutil.rmtree(prepared)
    n = len([d for d in os.listdir(args.raw) if not d.startswith(".")])
    t = time.perf_counter()
    convert(args.raw, prepared, workers=args.convert_workers, val_cases=1, folds=0, log=lambda *a, **k: None)
    seconds = time.perf_counter() - t
    size = sum(os.path.getsize(os.path.join(prepared, f)) for f in os.listdir(prepared))
    print(f"conversion: {n} cases in {seconds:.1f} s = {seconds / n:.2f} s/case with {args.convert_workers} "
          f"worker(s); {size / n / 2**20:.1f} MiB/case on disk")

    config = _config(args.config)
    b = config.train.batch_size
    for workers in [int(w) for w in args.pipeline_workers.split(",")]:
        config.data.num_workers = workers
        it = iter(train_dataset(prepared, config.data, seed=0, batch_size=b))
        next(it)  # start-up (worker processes, first reads) is not throughput
        t = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        rate = args.batches * b / (time.perf_counter() - t)
        print(f"pipeline: {workers} worker(s): {rate:.2f} patches/s of {tuple(batch['image'].shape[1:])} "
              f"(batch {b}, augmentation from {args.config})", flush=True)
        del it
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak RSS: this process {kib / 2**20:.2f} GiB, largest worker process {kib_children / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
