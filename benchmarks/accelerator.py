"""A config's figures on the accelerator JAX finds, from a bare machine, in one command under a
time budget: train-step throughput fed by the real input pipeline (with and without
data.augment_on_device), the device's own step rate, peak device memory, and a whole-volume
prediction with the 8 mirrorings.

    python benchmarks/accelerator.py [--config configs/brats21.py] [--cases 8] [--workers 8]
        [--budget_s 230] [--phases CPU_augmentation,predict,augment_on_device] [--work DIR]
        [--set KEY=VALUE ...] [--smoke]

1. data: --cases synthetic BraTS-like cases at full size (python -m data_prep.synthetic, 240 x 240
   x 155) converted to shards (python -m data_prep.convert, one case per shard so the --workers
   convert in parallel; 1 val case, the rest train), on the CPU, while phase 2's first process
   compiles its step: the budget pays for the two once, and that compile time is measured beside
   the generation's load.
2. train, with data.augment_on_device False (phase CPU_augmentation) and True (phase
   augment_on_device, run last: its compilation is the longest), each in a process of its own (so
   each peak is its own): the step of steps.sharded_steps compiled ahead of time, then fed by
   pipeline.train_dataset and sharding.global_batch exactly as train.py feeds it (Grain over the
   ArrayRecord shards, the config's workers, augmentation on them or on the device). Steady state:
   after at least --warmup_s and more steps than the pipeline's buffers hold (workers x per-worker
   buffer + read-ahead + the group in hand, in batches: the workers start together, so their first
   elements arrive as one burst), steps over --measure_s; then the same compiled step on one batch
   left on the device (the device's own rate). The share of the fed window spent waiting for the
   next batch says which one bounds. At most two steps are in flight, so the host never queues
   more work than it can time.
3. predict (between the two train phases): segguided_jax.inference.predictor.VolumePredictor with the
   config's eval window, overlap and batch, the finest attention map and the 8 mirrorings
   (predict's default), on the first case's
   full grid (its preprocessed image put back in place: 240 x 240 x 155 x 4), with freshly
   initialised parameters (a trained network costs the same): the first call (compiles) and
   --predict_repeats calls after it; then the case's brain box as predict crops it.

Printed: the card (jax.devices()[0].device_kind), jax's version, every phase's figures as it ends
and a summary. A phase that would start with less than its minimum of the budget left is skipped
with the reason, and a running one is stopped at the budget. --smoke: the tiny config on small
cases, seconds on a CPU (the script's own check).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("CPU_augmentation", "predict", "augment_on_device")

# Full size: what the BraTS cases are.
FULL_SHAPE = (240, 240, 155)
# --smoke: the tiny config (16³ patches and windows) on cases its crops fit, one Grain worker so
# the worker path runs too, and windows of seconds.
SMOKE = {"config": "configs/tiny.py", "cases": 3, "shape": (48, 48, 32), "workers": 2, "warmup_s": 1.0,
         "measure_s": 2.0, "resident_steps": 3, "predict_repeats": 1, "set": ["data.num_workers=1"]}


def load_config(path: str, overrides: list[str]):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, value = item.split("=", 1)
        node, *path_, leaf = [config] + key.split(".")
        for part in path_:
            node = node[part]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value  # a plain string
    return config


def _print(text: str) -> None:
    print(text, flush=True)


def _device_header(jax) -> dict:
    d = jax.devices()[0]
    return {"device": d.device_kind, "devices": jax.device_count(), "platform": d.platform,
            "jax": jax.__version__}


def _peak_gib(jax) -> float | None:
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def _wait_for(path: str, timeout_s: float) -> dict:
    t = time.perf_counter()
    while not os.path.exists(path):
        if time.perf_counter() - t > timeout_s:
            raise TimeoutError(f"no {path} after {timeout_s:.0f} s")
        time.sleep(0.2)
    with open(path) as f:
        return json.load(f)


class InFlight:
    """Steps dispatched but not finished, at most `limit`: dispatch returns at once, so without a
    bound the host could queue minutes of steps inside a window meant to last seconds."""

    def __init__(self, jax, limit: int = 2):
        self.jax, self.limit, self.pending = jax, limit, []

    def add(self, out) -> None:
        self.pending.append(out)
        if len(self.pending) > self.limit:
            self.jax.block_until_ready(self.pending.pop(0))

    def drain(self) -> None:
        self.jax.block_until_ready(self.pending)
        self.pending = []


def child_train(args) -> dict:
    """Phase 2 for one value of data.augment_on_device; returns its figures."""
    import jax

    from segguided_jax import config_schema
    from segguided_jax.parallel import sharding
    from segguided_jax.data.pipeline import train_dataset
    from segguided_jax.training.steps import abstract_batch, sharded_steps

    config = load_config(args.config, args.set)
    config.data.augment_on_device = args.augment_on_device
    derived = config_schema.validate(config)
    out = _device_header(jax)
    # As train.py builds its step and pipeline.
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.train.batch_size, config.data.patch, mesh, derived.size_divisor)
    fns = sharded_steps(config, mesh)
    t = time.perf_counter()
    step = fns.step.lower(fns.abstract, abstract_batch(config, mesh)).compile()
    out["compile_s"] = time.perf_counter() - t
    _print(f"compiled in {out['compile_s']:.1f} s")  # progress lines: the log's tail if the budget stops it
    state = jax.block_until_ready(fns.init())

    t = time.perf_counter()
    data = _wait_for(args.data_ready, args.wait_s)
    if not data.get("ok"):
        raise RuntimeError(f"no data: {data.get('error')}")
    out["waited_for_data_s"] = time.perf_counter() - t
    config.data.dir = data["prepared"]
    b = config.train.batch_size
    data_iter = iter(train_dataset(config.data.dir, config.data, seed=config.seed,
                                   batch_size=b // jax.process_count(), plan=fns.plan))

    def next_batch():
        host = next(data_iter)
        host.pop("case_id", None)
        return sharding.global_batch(host, mesh, fns.batch)

    inflight = InFlight(jax)
    # Batches the pipeline's buffers hold: each worker's buffered element, the read-ahead and the
    # group being split, each patches_per_case batches. The workers start together, so the first
    # of these arrive as one burst that is no steady rate.
    k = config.data.patches_per_case
    buffered = k * (config.data.num_workers + config.data.prefetch + 1)
    t = time.perf_counter()
    batch = next_batch()
    out["first_batch_s"] = time.perf_counter() - t
    _print(f"first batch in {out['first_batch_s']:.1f} s; warming up for {buffered + 1} steps and {args.warmup_s} s")
    n = 0
    while n < buffered + 1 or time.perf_counter() - t < args.warmup_s:
        state, metrics = step(state, batch)
        inflight.add(metrics)
        batch = next_batch()
        n += 1
        if n % 10 == 0:
            _print(f"warm-up: {n} steps in {time.perf_counter() - t:.1f} s")
    inflight.drain()
    out["warmup_steps"], out["warmup_s"] = n, time.perf_counter() - t
    _print(f"warm-up done: {n} steps in {out['warmup_s']:.1f} s")

    n, waited, t = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t < args.measure_s:
        state, metrics = step(state, batch)
        inflight.add(metrics)
        w = time.perf_counter()
        batch = next_batch()
        waited += time.perf_counter() - w
        n += 1
    inflight.drain()
    seconds = time.perf_counter() - t
    out.update(fed_steps=n, fed_s=seconds, fed_patches_per_s=n * b / seconds, fed_wait_share=waited / seconds)
    loss = float(jax.device_get(metrics["loss"]))

    for _ in range(2):  # the batch now lives on the device; its first steps settle the clocks
        state, metrics = step(state, batch)
        inflight.add(metrics)
    inflight.drain()
    n, t = 0, time.perf_counter()
    # --resident_steps, or fewer (3 at least) where the step is slow enough to take --measure_s.
    while n < args.resident_steps and (n < 3 or time.perf_counter() - t < args.measure_s):
        state, metrics = step(state, batch)
        inflight.add(metrics)
        n += 1
    inflight.drain()
    seconds = time.perf_counter() - t
    out.update(resident_steps=n, resident_step_ms=1000 * seconds / n, resident_patches_per_s=n * b / seconds, loss=loss,
               peak_gib=_peak_gib(jax), batch=b, patch=list(config.data.patch),
               dtype=config.model.compute_dtype, workers=config.data.num_workers,
               patches_per_case=k, batch_shapes={key: list(v.shape) for key, v in batch.items()})
    return out


def child_predict(args) -> dict:
    """Phase 3; returns its figures."""
    import jax
    import numpy as np
    from flax import nnx

    from segguided_jax.data.cases import brats_case, load_case
    from segguided_jax.data.preprocess import preprocess
    from segguided_jax.inference.predictor import window_starts
    from segguided_jax.inference.trained_model import TrainedModel
    from segguided_jax.models.network import build_model

    config = load_config(args.config, args.set)
    out = _device_header(jax)
    data = _wait_for(args.data_ready, args.wait_s)
    case_dir = os.path.join(data["raw"], sorted(os.listdir(data["raw"]))[0])
    t = time.perf_counter()
    case = load_case(brats_case(case_dir))
    # predict resamples only to another voxel size than the case's; these cases are at 1 mm.
    image, _, meta = preprocess(case, None)
    out["read_preprocess_s"] = time.perf_counter() - t
    full = np.zeros(tuple(meta["orig_shape"]) + image.shape[-1:], np.float32)
    full[tuple(slice(lo, hi) for lo, hi in meta["crop_box"])] = image

    graphdef, params = nnx.split(build_model(config.model, nnx.Rngs(config.seed)), nnx.Param)
    # predict's defaults: the config's window, overlap and batch, 8 mirrorings, the finest maps.
    predictor = TrainedModel.in_training(config, graphdef, params, config.data.dir).predictor()
    out.update(shape=list(full.shape), crop_shape=list(image.shape), window=list(predictor.window),
               overlap=predictor.overlap, eval_batch=predictor.batch_size,
               passes=2 ** len(predictor.mirror_axes), attention_stages=list(predictor.attention_stages),
               windows=len(window_starts(full.shape[:3], predictor.window, predictor.overlap)),
               crop_windows=len(window_starts(tuple(max(s, w) for s, w in zip(image.shape[:3], predictor.window)),
                                              predictor.window, predictor.overlap)))
    t = time.perf_counter()
    result = predictor(full)  # returns numpy: the whole volume is back on the host
    out["first_s"] = time.perf_counter() - t
    times = []
    for _ in range(args.predict_repeats):
        t = time.perf_counter()
        predictor(full)
        times.append(time.perf_counter() - t)
    out["steady_s"] = times
    out["outputs"] = list(result.shape)
    crop_times = []
    for _ in range(2):  # the first compiles the gather and accumulation for this volume shape
        t = time.perf_counter()
        predictor(image)
        crop_times.append(time.perf_counter() - t)
    out["crop_first_s"], out["crop_s"] = crop_times
    out["peak_gib"] = _peak_gib(jax)
    return out


def _run(cmd: list[str], env: dict, log_path: str, timeout_s: float) -> int | None:
    """Runs cmd with its output in log_path, in a process group of its own, killed whole at
    timeout_s (returns None then) and cleared when it ends: worker processes it leaves behind
    (Grain's, a process pool's) would otherwise outlive it, holding the CPUs."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            return None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def run_data(args, work: str, ready: str, log: list) -> None:
    """Phase 1, in a thread of the parent: generation, then conversion, each a project command;
    writes `ready` last (ok or the error) so the children stop waiting either way."""
    raw, prepared = os.path.join(work, "raw"), os.path.join(work, "prepared")
    # CPU only: these processes must not take the accelerator's memory from the child beside them.
    env = {**_env(), "JAX_PLATFORMS": "cpu"}
    result = {"ok": False, "raw": raw, "prepared": prepared}
    try:
        shape = [str(s) for s in args.shape]
        for name, cmd in (
                ("generate", [sys.executable, "-m", "data_prep.synthetic", "--out", raw, "--cases", str(args.cases),
                              "--workers", str(args.workers), "--shape", *shape, "--seed", "0"]),
                ("convert", [sys.executable, "-m", "data_prep.convert", "--src", raw, "--out", prepared,
                             "--workers", str(args.workers), "--cases-per-shard", "1", "--test-cases", "0",
                             "--val-cases", "1", "--folds", "0"])):
            t, log_path = time.perf_counter(), os.path.join(work, f"{name}.log")
            code = _run(cmd, env, log_path, args.deadline - time.time())
            if code != 0:
                why = "stopped at the budget" if code is None else f"failed (exit {code})"
                raise RuntimeError(f"{name} {why}:\n{_tail(log_path, 2000)}")
            result[f"{name}_s"] = time.perf_counter() - t
            _print(f"data: {name} {args.cases} cases of {tuple(args.shape)} with {args.workers} worker(s): "
                   f"{result[f'{name}_s']:.1f} s | {_tail(log_path, 300).strip().splitlines()[-1]}")
        result["ok"] = True
    except Exception as e:  # noqa: BLE001  (reported, and the children told)
        result["error"] = f"{type(e).__name__}: {e}"
        _print(f"data: {result['error']}")
    log.append(result)
    with open(ready + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(ready + ".tmp", ready)


def run_child(args, phase: str, kind: str, ready: str, min_s: float, extra: list[str]) -> dict | None:
    left = args.deadline - time.time()
    if left < min_s:
        _print(f"{phase}: skipped: {left:.0f} s of the budget left, this phase needs at least {min_s:.0f} s")
        return None
    work = os.path.dirname(ready)
    result_path, log_path = os.path.join(work, f"{phase}.json"), os.path.join(work, f"{phase}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--data_ready", ready, "--result", result_path,
           "--config", args.config,
           "--warmup_s", str(args.warmup_s), "--measure_s", str(args.measure_s),
           "--resident_steps", str(args.resident_steps), "--predict_repeats", str(args.predict_repeats),
           "--wait_s", str(max(1.0, left)), *extra]
    for item in args.set:
        cmd += ["--set", item]
    t = time.perf_counter()
    code = _run(cmd, _env(), log_path, left)
    if code != 0 or not os.path.exists(result_path):
        why = "stopped at the budget" if code is None else f"failed (exit {code})"
        _print(f"{phase}: {why} after {time.perf_counter() - t:.0f} s; the end of its output:\n{_tail(log_path)}")
        return None
    with open(result_path) as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - t
    return result


def _fmt_gib(v) -> str:
    return "n/a (no memory_stats on this device)" if v is None else f"{v:.2f} GiB"


def print_train(name: str, r: dict) -> None:
    _print(f"train [{name}]: batch {r['batch']} x {tuple(r['patch'])} {r['dtype']}, {r['workers']} Grain worker(s), "
           f"{r['patches_per_case']} patches per case; batch on the device {r['batch_shapes']}")
    _print(f"  compile {r['compile_s']:.1f} s (then waited {r['waited_for_data_s']:.1f} s for the data); first batch "
           f"{r['first_batch_s']:.1f} s; warm-up {r['warmup_steps']} steps in {r['warmup_s']:.1f} s")
    _print(f"  fed by the pipeline: {r['fed_patches_per_s']:.2f} patches/s ({r['fed_steps']} steps in "
           f"{r['fed_s']:.1f} s, {1000 * r['fed_s'] / r['fed_steps']:.1f} ms/step; {100 * r['fed_wait_share']:.0f} % "
           "of it waiting for the next batch)")
    _print(f"  resident batch: {r['resident_patches_per_s']:.2f} patches/s ({r['resident_step_ms']:.1f} ms/step over "
           f"{r['resident_steps']} steps; fed = {100 * r['fed_patches_per_s'] / r['resident_patches_per_s']:.0f} % of "
           f"it) | peak device memory {_fmt_gib(r['peak_gib'])} | loss {r['loss']:.4f}")


def print_predict(r: dict) -> None:
    _print(f"predict: volume {tuple(r['shape'])} -> outputs {tuple(r['outputs'])}; window {tuple(r['window'])}, "
           f"overlap {r['overlap']}, {r['windows']} windows x {r['passes']} mirrorings, batch {r['eval_batch']}, "
           f"attention stages {r['attention_stages']}")
    steady = ", ".join(f"{s:.2f}" for s in r["steady_s"])
    _print(f"  first call (compiles) {r['first_s']:.1f} s; then {steady} s | brain box {tuple(r['crop_shape'])} "
           f"({r['crop_windows']} windows): {r['crop_s']:.2f} s (first {r['crop_first_s']:.1f} s) | reading and "
           f"preprocessing the case {r['read_preprocess_s']:.1f} s | peak device memory {_fmt_gib(r['peak_gib'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="default configs/brats21.py (--smoke: configs/tiny.py)")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help="config override, e.g. data.num_workers=12 (repeatable)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (default 8; 1 validates)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help=f"case shape (default {FULL_SHAPE})")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes generating and converting cases (default: min(cases, CPUs))")
    parser.add_argument("--budget_s", type=float, default=230.0, help="wall-clock budget of the whole command")
    parser.add_argument("--train_min_s", type=float, default=45.0, help="skip a train phase with less left")
    parser.add_argument("--predict_min_s", type=float, default=25.0, help="skip the predict phase with less left")
    parser.add_argument("--warmup_s", type=float, default=None, help="default 6")
    parser.add_argument("--measure_s", type=float, default=None, help="default 12")
    parser.add_argument("--resident_steps", type=int, default=None, help="default 20")
    parser.add_argument("--predict_repeats", type=int, default=None, help="default 2")
    parser.add_argument("--phases", type=lambda v: v.split(","), default=list(PHASES),
                        help=f"comma-separated, run in this order: {','.join(PHASES)}")
    parser.add_argument("--work", default=None, help="folder for the cases (default: a new temporary one)")
    parser.add_argument("--smoke", action="store_true", help="the tiny config on small cases: a quick CPU check")
    parser.add_argument("--child", choices=["train", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--data_ready", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--wait_s", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--augment_on_device", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if set(args.phases) - set(PHASES):
        parser.error(f"--phases {args.phases}: each one of {', '.join(PHASES)}")
    defaults = {"config": "configs/brats21.py", "cases": 8, "shape": FULL_SHAPE, "warmup_s": 6.0, "measure_s": 12.0,
                "resident_steps": 20, "predict_repeats": 2, "set": []}
    for key, value in (SMOKE if args.smoke else defaults).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.config = os.path.join(ROOT, args.config) if not os.path.isabs(args.config) else args.config

    if args.child:
        # Grain's worker processes read absl flags, which nothing parses in this process.
        from absl import flags
        flags.FLAGS.mark_as_parsed()
        result = child_train(args) if args.child == "train" else child_predict(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        sys.stdout.flush()
        sys.stderr.flush()
        # Grain's worker processes and the runtime's threads need no orderly teardown here (the
        # parent clears the process group).
        os._exit(0)

    import tempfile
    from importlib.metadata import version

    start = time.time()
    args.deadline = start + args.budget_s
    args.workers = args.workers or max(1, min(args.cases, os.cpu_count() or 1))
    work = args.work or tempfile.mkdtemp(prefix="segguided-accel-")
    os.makedirs(work, exist_ok=True)
    ready = os.path.join(work, "data.json")
    if os.path.exists(ready):
        os.remove(ready)
    _print(f"accelerator benchmark: {os.path.relpath(args.config, ROOT)} {' '.join(args.set)}; jax {version('jax')}; "
           f"{os.cpu_count()} CPUs; budget {args.budget_s:.0f} s; cases in {work}")
    data_log: list = []
    data_thread = threading.Thread(target=run_data, args=(args, work, ready, data_log), daemon=True)
    data_thread.start()
    results = {}
    # The predict phase before the augment_on_device one, whose compilation is the longest: what
    # the budget cuts is then one phase, which --phases can run alone.
    for phase in [p for p in PHASES if p in args.phases]:
        if phase == "predict":
            r = run_child(args, phase, "predict", ready, args.predict_min_s, [])
        else:
            r = run_child(args, phase, "train", ready, args.train_min_s,
                          ["--augment_on_device"] if phase == "augment_on_device" else [])
        if not r:
            continue
        if "device" not in results:
            _print(f"device: {r['device']} x{r['devices']} ({r['platform']}), jax {r['jax']}")
            results["device"] = r["device"]
        print_predict(r) if phase == "predict" else print_train(phase, r)
        results[phase] = r

    _print(f"summary ({results.get('device', 'device unknown')}, jax {version('jax')}, "
           f"total {time.time() - start:.0f} s of {args.budget_s:.0f}):")
    if data_log and data_log[0]["ok"]:
        d = data_log[0]
        _print(f"  data: {args.cases} cases of {tuple(args.shape)}: generated in {d['generate_s']:.1f} s, converted in "
               f"{d['convert_s']:.1f} s ({args.workers} workers)")
    for name in [p for p in PHASES if p in args.phases and p != "predict"]:
        if name in results:
            r = results[name]
            _print(f"  train, {name}: {r['fed_patches_per_s']:.2f} patches/s fed by the pipeline, "
                   f"{r['resident_patches_per_s']:.2f} on a resident batch; peak {_fmt_gib(r['peak_gib'])}; "
                   f"compile {r['compile_s']:.1f} s")
        else:
            _print(f"  train, {name}: not measured (above)")
    if "predict" in results:
        r = results["predict"]
        _print(f"  predict {tuple(r['shape'])}, {r['passes']} mirrorings: {min(r['steady_s']):.2f} s steady, "
               f"{r['first_s']:.1f} s with compilation; peak {_fmt_gib(r['peak_gib'])}")
    elif "predict" in args.phases:
        _print("  predict: not measured (above)")
    sys.exit(0 if all(p in results for p in args.phases) else 1)


if __name__ == "__main__":
    main()
