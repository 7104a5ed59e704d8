"""Conversion and input-pipeline throughput on full-size cases, and the sampling geometry.

    python -m data_prep.synthetic --out DIR --cases 6 --workers 2      # full-size 240 x 240 x 155
    python benchmarks/data_pipeline.py --raw DIR [--prepared DIR] [--convert-workers 1]
        [--batches 12] [--rounds 3] [--pipeline-workers 0] [--patches-per-case 1,2,4]
        [--config configs/brats21.py] [--baseline-src OTHER_CHECKOUT] [--outside-samples 400]
        [--device-batches 3]

1. Converts the BraTS-layout cases in --raw (prints seconds and MiB per case), and writes a copy
   of the result with the images stored as int16 plus the conversion's statistics (records.py;
   bit-exact), to measure both storages.
2. Runs the training pipeline of the config (its patch, batch size and augmentation) over each
   storage with each --patches-per-case, every run in a fresh process, --rounds times round-robin
   (seed = round), and prints the totals: patches/s (wall) and CPU seconds per patch (this
   process, no read-ahead thread: with 0 workers, patches per CPU-second is the throughput per
   core; --batches must be a multiple of each patches_per_case). With --baseline-src (e.g.
   `git worktree add /tmp/base <commit>`), the same measurement runs in every round on that
   checkout's own conversion and pipeline, so before and after come from one run on one machine,
   and every row prints its ratio to it.
3. Sampling geometry, from the config's augmentation and the converted cases' shapes and crop
   boxes: the share of patch voxels whose source point lies outside the original image grid (no
   data: a 0 that is not the case's background) and outside the case's brain box (background
   that is 0 in the original too), over --outside-samples patches, for the config's augmentation
   and for forced rotations and scalings; beside it the share that a final-size crop rotated and
   scaled in place (the pipeline before nnU-Net-faithful sampling) reads outside itself.
4. With --device-batches > 0: segguided_jax.data.device_augment.augment_batch on this machine's
   default JAX device (jitted; compile time excluded), batches of the config's enlarged crops.
Peak resident memory of this process and of the largest child is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process with PYTHONPATH set to the tree under test (this one or --baseline-src),
# so it uses only what both trees have: the config file and train_dataset(dir, data_cfg, seed=,
# batch_size=). Prints one JSON line.
_MEASURE = r"""
import importlib.util, json, sys, time
from absl import flags
flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("bench_config", args["config"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
for key, value in args["overrides"].items():
    if key in config.data:
        config.data[key] = value
from segguided_jax.data.pipeline import train_dataset
b = config.train.batch_size
it = iter(train_dataset(args["prepared"], config.data, seed=args["seed"], batch_size=b))
for _ in range(args["warmup"]):  # start-up (worker processes, first reads, the first group) is not throughput
    batch = next(it)
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(args["batches"]):
    batch = next(it)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
n = args["batches"] * b
print(json.dumps({"patches": n, "wall_s": wall, "cpu_s": cpu, "shape": list(batch["image"].shape[1:])}))
"""


def _config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _measure(tree: str, prepared: str, config: str, batches: int, overrides: dict, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    # whole groups of patches_per_case batches in the warm-up and in the timed window
    k = overrides.get("patches_per_case", 1)
    if batches % k:
        raise ValueError(f"--batches {batches} must be a multiple of patches_per_case {k}")
    args = json.dumps({"prepared": prepared, "config": config, "batches": batches, "overrides": overrides,
                       "warmup": k, "seed": seed})
    out = subprocess.run([sys.executable, "-c", _MEASURE, args], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"pipeline run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_mib_per_case(folder: str, n: int) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".array_record")) / n / 2**20


def int16_copy(prepared: str, out: str) -> int:
    """Writes `prepared` again with every record re-encoded with its manifest statistics (int16
    where that is exact); returns how many records came out int16."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from data_prep.convert import RECORD_OPTIONS
    from segguided_jax.data.records import decode_case, encode_case, load_manifest, read_case

    manifest = load_manifest(prepared)
    norms = {c["id"]: c["norm"] for c in manifest["cases"]}
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    for name in os.listdir(prepared):
        if not name.endswith(".array_record"):
            shutil.copy(os.path.join(prepared, name), out)
    n_int16 = 0
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(os.path.join(prepared, shard))
        writer = ArrayRecordWriter(os.path.join(out, shard), RECORD_OPTIONS)
        for i in range(reader.num_records()):
            case = decode_case(reader.read([i])[0])
            record = encode_case(case["case_id"], case["image"], case.get("label"), norm=norms[case["case_id"]])
            n_int16 += read_case(record).stored_dtype == "int16"
            writer.write(record)
        writer.close()
        reader.close()
    return n_int16


def outside_shares(manifest: dict, data_cfg, samples: int, seed: int = 0) -> dict:
    """Mean shares of patch voxels reading outside the original grid / the brain box (this
    pipeline's placement and resampling), and outside a final-size crop rotated in place (before)."""
    import numpy as np

    from segguided_jax.data.augment import draw_spatial, initial_patch_size
    from segguided_jax.data.transforms import enlarged_start, final_start, outside_fraction

    patch = tuple(int(p) for p in data_cfg.patch)
    initial = initial_patch_size(patch, data_cfg.augment)
    rng = np.random.default_rng(seed)
    half = (np.asarray(patch) - 1) / 2
    grid, box, crop = [], [], []
    cases = [c for c in manifest["cases"] if c.get("has_label", True)]
    for k in range(samples):
        case = cases[k % len(cases)]
        start = final_start(enlarged_start(case["shape"], patch, initial, rng), patch, initial)
        matrix = draw_spatial(rng, data_cfg.augment)
        centre = start + half
        offset = np.asarray(case["crop_box"])[:, 0]
        step = max(1, patch[0] // 32)  # a 32³ lattice of the patch's voxels is plenty for a mean
        grid.append(outside_fraction(case["orig_shape"], matrix, centre + offset, patch, step))
        box.append(outside_fraction(case["shape"], matrix, centre, patch, step))
        crop.append(outside_fraction(patch, matrix, half, patch, step))
    return {"grid": float(np.mean(grid)), "box": float(np.mean(box)), "crop": float(np.mean(crop))}


def device_augment_speed(data_cfg, batch_size: int, batches: int) -> str:
    import jax
    import numpy as np

    from segguided_jax.data.augment import initial_patch_size
    from segguided_jax.data.device_augment import augment_batch, draw

    initial = initial_patch_size(data_cfg.patch, data_cfg.augment)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((batch_size,) + initial + (4,), np.float32)
    label = rng.integers(0, 4, (batch_size,) + initial).astype(np.uint8)
    draws = [jax.device_put(np.stack([draw(rng, data_cfg.augment, 4) for _ in range(batch_size)]))
             for _ in range(batches + 1)]
    fn = jax.jit(lambda x, y, d: augment_batch(x, y, d, data_cfg))
    image, label = jax.device_put(image), jax.device_put(label)
    t = time.perf_counter()
    jax.block_until_ready(fn(image, label, draws[0]))
    compile_s = time.perf_counter() - t
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(batches):
        jax.block_until_ready(fn(image, label, draws[i + 1]))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = batches * batch_size
    return (f"device augmentation ({jax.devices()[0].device_kind}, {jax.device_count()} device(s)): batch "
            f"{batch_size} x {initial} -> {tuple(data_cfg.patch)}: {n / wall:.2f} patches/s, "
            f"{cpu / n:.3f} CPU s/patch (all threads), first call (compile) {compile_s:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--prepared", default=None, help="default: a fresh folder beside --raw")
    parser.add_argument("--convert-workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per run and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all runs, seeds 0, 1, ...")
    parser.add_argument("--pipeline-workers", default="0", help="comma-separated Grain worker counts")
    parser.add_argument("--patches-per-case", default="1,2,4", help="comma-separated values to measure")
    parser.add_argument("--config", default="configs/brats21.py")
    parser.add_argument("--baseline-src", default=None, help="another checkout to measure first, as the baseline")
    parser.add_argument("--outside-samples", type=int, default=400)
    parser.add_argument("--device-batches", type=int, default=3, help="0 skips the device augmentation")
    args = parser.parse_args()
    config_path = os.path.abspath(args.config)

    from data_prep.convert import convert
    from segguided_jax.data.records import load_manifest

    prepared = args.prepared or os.path.normpath(args.raw) + "-prepared-bench"
    if os.path.exists(prepared):
        shutil.rmtree(prepared)
    n = len([d for d in os.listdir(args.raw) if not d.startswith(".")])
    t = time.perf_counter()
    convert(args.raw, prepared, workers=args.convert_workers, val_cases=1, folds=0, log=lambda *a, **k: None)
    seconds = time.perf_counter() - t
    print(f"conversion: {n} cases in {seconds:.1f} s = {seconds / n:.2f} s/case with {args.convert_workers} "
          f"worker(s); {_dir_mib_per_case(prepared, n):.1f} MiB/case on disk", flush=True)
    int16_dir = prepared + "-int16"
    n_int16 = int16_copy(prepared, int16_dir)
    print(f"int16 copy: {n_int16} of {n} records int16 (bit-exact), {_dir_mib_per_case(int16_dir, n):.1f} MiB/case "
          "on disk", flush=True)

    config = _config(config_path)
    workers = [int(w) for w in args.pipeline_workers.split(",")]
    # No read-ahead thread: every patch is made inside next(), in this process, so CPU seconds per
    # patch (0 workers) is the cost on one core and the timed window holds whole groups only.
    common = {"read_threads": 0, "prefetch": 0}
    runs = []  # (name, storage, k, workers, tree, prepared, config, overrides)
    if args.baseline_src:
        base_tree = os.path.abspath(args.baseline_src)
        base_prepared = prepared + "-baseline"
        if os.path.exists(base_prepared):
            shutil.rmtree(base_prepared)
        subprocess.run([sys.executable, "-m", "data_prep.convert", "--src", args.raw, "--out", base_prepared,
                        "--val-cases", "1", "--folds", "0"], cwd=base_tree, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": base_tree})
        base_config = os.path.join(base_tree, os.path.relpath(config_path, ROOT))
        for w in workers:
            runs.append((f"baseline {base_tree}", "its own", "-", w, base_tree, base_prepared, base_config,
                         {**common, "num_workers": w}))
    for storage, folder in (("float32", prepared), ("int16", int16_dir)):
        for k in [int(v) for v in args.patches_per_case.split(",")]:
            for w in workers:
                runs.append(("this tree", storage, k, w, ROOT, folder, config_path,
                             {**common, "num_workers": w, "patches_per_case": k}))
    # Rounds over all runs, each round with its own seed: the machine's load drifts over minutes,
    # and which patches draw a rotation (the costliest transform) varies from seed to seed.
    totals = [{"patches": 0, "wall_s": 0.0, "cpu_s": 0.0} for _ in runs]
    for r in range(args.rounds):
        for total, (name, storage, k, w, tree, folder, cfg_path, overrides) in zip(totals, runs):
            m = _measure(tree, folder, cfg_path, args.batches, overrides, seed=r)
            for key in ("patches", "wall_s", "cpu_s"):
                total[key] += m[key]
            total["shape"] = m["shape"]
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for total, run in zip(totals, runs):
        _print_row(run[:4], total, totals[0] if args.baseline_src else None)

    manifest = load_manifest(prepared)
    patch = tuple(config.data.patch)
    print(f"sampling geometry, {args.outside_samples} patches of {patch} from the {n} cases' shapes and crop boxes: "
          "share of patch voxels read outside the original image grid (no data) | outside the brain box "
          "(background, 0 in the original too) | before: outside a final-size crop rotated/scaled in place")
    from segguided_jax.data.augment import default_augment_config

    settings = [(f"{os.path.basename(config_path)} augmentation", config.data.augment)]
    for name, overrides in (("rotation 30° on every patch", dict(rotation_probability=1.0, scale_probability=0.0)),
                            ("scale 1.4 on every patch", dict(rotation_probability=0.0, scale_probability=1.0,
                                                               scale_range=(1.4, 1.4))),
                            ("rotation 15° + scale 1.2", dict(rotation_probability=1.0, rotation_max_degrees=15.0,
                                                              scale_probability=1.0, scale_range=(1.2, 1.2)))):
        aug = default_augment_config()
        aug.update(overrides)
        settings.append((name, aug))
    for name, aug in settings:
        data_cfg = config.data.copy_and_resolve_references()
        data_cfg.augment = aug
        s = outside_shares(manifest, data_cfg, args.outside_samples)
        print(f"  {name:36s} outside the grid {100 * s['grid']:5.2f} % | outside the brain box {100 * s['box']:5.2f} % "
              f"| before {100 * s['crop']:5.2f} %", flush=True)

    if args.device_batches > 0:
        print(device_augment_speed(config.data, config.train.batch_size, args.device_batches), flush=True)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak RSS: this process {kib / 2**20:.2f} GiB, largest child process {kib_children / 2**20:.2f} GiB")


def _print_row(run, m, base):
    name, storage, k, workers = run
    rate, per_core = m["patches"] / m["wall_s"], m["patches"] / m["cpu_s"]
    ratio = ""
    if base is not None:
        ratio = (f" | x{rate / (base['patches'] / base['wall_s']):.2f} wall, "
                 f"x{per_core / (base['patches'] / base['cpu_s']):.2f} per core vs the baseline")
    print(f"pipeline: {name}, {storage} records, patches_per_case {k}, {workers} worker(s), {m['patches']} patches: "
          f"{rate:.2f} patches/s, {m['cpu_s'] / m['patches']:.3f} CPU s/patch = {per_core:.2f} patches per "
          f"CPU-second, patch {tuple(m['shape'])}{ratio}", flush=True)


if __name__ == "__main__":
    main()
