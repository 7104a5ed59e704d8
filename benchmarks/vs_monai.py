"""Our train step side by side with MONAI's DynUNet at the same widths, patch and batch, on the CPU.

    python benchmarks/vs_monai.py --config=configs/synthetic.py \
        [--patch=64 --widths=16,32,64,128] [--dtypes=float32,bfloat16] [--rounds=5 --steps=3] \
        [--ours_python=/path/to/other/venv/bin/python] [--xla_flag_sets='default;none;...']

Every variant runs in a worker process of its own, started once and then asked for `--steps`
train steps per round, round after round, so that all variants see the same machine load; the
figures are medians over all timed steps (after two warm-up steps). A train step is forward,
backward and AdamW on a batch of `train.batch_size` random patches (batch 2 in the configs).

Variants:
- ours: `steps.train_step` of this checkout (jitted, state donated, as in training) for each dtype
  in --dtypes (model.compute_dtype; parameters stay float32) under this interpreter and the first
  XLA flag set; then, in the first dtype only, for each further flag set in --xla_flag_sets
  ("default": the XLA_FLAGS of this environment plus the package's own, segguided_jax/runtime.py; "none": no flags;
  anything else: that string) and each interpreter in --ours_python (e.g. a Python 3.11 venv with
  jax 0.10.2, which must have this package's dependencies).
- MONAI: benchmarks/monai_peer.py (DynUNet with residual blocks, instance norm, LeakyReLU,
  stride-2 3³ downsampling, transposed-conv upsampling, DiceCE, AdamW, --threads threads), in
  float32 and, if bfloat16 is among --dtypes, CPU autocast bf16. It runs in its own venv, which
  is made on first use under .cache/monai-venv with `pip install torch==2.13.0 monai` (the CPU
  wheel of torch 2.13.0 for Python 3.11 is the one pip finds on this machine kind; elsewhere point
  --peer_python at any interpreter that has torch and monai). Never a dependency of the package.

DynUNet cannot express a 2³ downsampling kernel (each stage's residual block uses one kernel for
its stride-2 and its stride-1 conv), so both sides use 3³ (--down_kernel). The networks differ
where DynUNet's layout differs from ours: our encoder stages are a stride-2 conv–IN–LeakyReLU
followed by a residual block (three convs), DynUNet's a residual block whose first conv has the
stride (two convs and a 1³ skip), and ours has the attention gates. Each side's GFLOP per step
(convolutions and matmuls of forward and backward, counted from the program) is printed, so the
ratio of step times can be read against the ratio of work.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_VENV = os.path.join(ROOT, ".cache", "monai-venv")
PEER_PACKAGES = ["torch==2.13.0", "monai"]


# ----------------------------------------------------------------------------- ours (worker side)

def _load_config(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def ours_worker(spec):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from segguided_jax.training.optim import make_optimizer
    from segguided_jax.training.steps import init_state, train_step

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hlo_cost import program_flops

    config = _load_config(spec["config"])
    n = len(spec["widths"])
    config.data.patch = (spec["patch"],) * 3
    config.model.widths = tuple(spec["widths"])
    if len(config.model.encoder_blocks) != n:  # one residual block per stage, as DynUNet
        config.model.encoder_blocks, config.model.decoder_blocks = (1,) * n, (1,) * (n - 1)
    config.model.down_kernel = spec["down_kernel"]
    config.model.compute_dtype = spec["dtype"]
    if spec.get("upsample"):
        config.model.upsample = spec["upsample"]
    b, patch = config.train.batch_size, tuple(config.data.patch)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((b,) + patch + (config.model.in_channels,), np.float32)),
             "label": jnp.asarray(rng.integers(0, 4, (b,) + patch), jnp.uint8)}
    tx = make_optimizer(config.optim, config.train.steps)
    state = jax.jit(functools.partial(init_state, config.seed, config.model, tx))()
    fn = functools.partial(train_step, loss_cfg=config.loss, output=config.model.output)
    flops = sum(v for k, v in program_flops(jax.make_jaxpr(fn)(state, batch).jaxpr).items() if not k.startswith("n_"))
    step = jax.jit(fn, donate_argnums=0)
    t = time.perf_counter()
    for _ in range(2):
        state, m = step(state, batch)
        jax.block_until_ready(m)
    params = sum(int(p.size) for p in jax.tree.leaves(state.params))
    print(json.dumps({"ready": True, "params": params, "flops": flops, "warmup_s": time.perf_counter() - t,
                      "python": platform.python_version(), "jax": jax.__version__,
                      "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": b,
                      "down_kernel": config.model.down_kernel, "upsample": config.model.upsample}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        times, cpu = [], []
        for _ in range(int(cmd)):
            t, c = time.perf_counter(), time.process_time()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(json.dumps({"steps": times, "cpu": cpu, "loss": float(m["loss"])}), flush=True)


# ----------------------------------------------------------------------------- orchestration

class Worker:
    """A variant's worker process: started, asked for steps round by round, then closed."""

    def __init__(self, name, cmd, env):
        self.name, self.times, self.cpu = name, [], []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        self.info = self._read()

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name}: worker exited with status {self.proc.wait()} (see its stderr above)")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, steps):
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.times += reply["steps"]
        self.cpu += reply["cpu"]
        self.info["loss"] = reply["loss"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def ensure_peer_python(peer_python):
    """The peer's interpreter: --peer_python, else .cache/monai-venv (made on first use)."""
    if peer_python:
        return peer_python
    python = os.path.join(PEER_VENV, "bin", "python")
    if not os.path.exists(os.path.join(PEER_VENV, ".complete")):
        base = next((p for p in ("python3.11", "python3") if _runs(p)), None)
        print(f"setup: creating {PEER_VENV} with {base} and pip install {' '.join(PEER_PACKAGES)}", flush=True)
        log = os.path.join(ROOT, ".cache", "monai-venv-install.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            ok = (subprocess.run([base, "-m", "venv", "--clear", PEER_VENV], stdout=f, stderr=f).returncode == 0
                  and subprocess.run([python, "-m", "pip", "install", *PEER_PACKAGES], stdout=f, stderr=f).returncode == 0)
        if not ok:
            raise SystemExit(f"setup of the MONAI peer failed; see {log}")
        open(os.path.join(PEER_VENV, ".complete"), "w").close()
    return python


def _runs(python):
    try:
        return subprocess.run([python, "-c", "import venv"], capture_output=True).returncode == 0
    except OSError:
        return False


def main():
    from absl import app, flags

    flags.DEFINE_string("config", None, "Config file for our side (model, batch, optimiser).")
    flags.DEFINE_integer("patch", None, "Cubic patch edge; default: the config's.")
    flags.DEFINE_list("widths", None, "Channel widths per stage; default: the config's.")
    flags.DEFINE_integer("down_kernel", 3, "Downsampling kernel of both sides (DynUNet needs 3).")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (ours: model.compute_dtype; MONAI: autocast).")
    flags.DEFINE_integer("rounds", 5, "Rounds; each runs --steps steps of every variant in turn.")
    flags.DEFINE_integer("steps", 3, "Timed steps per variant per round.")
    flags.DEFINE_integer("threads", 2, "MONAI's torch threads (XLA uses every core).")
    flags.DEFINE_list("ours_python", [], "Further interpreters to run our side under (e.g. a jax 0.10.2 venv).")
    flags.DEFINE_string("xla_flag_sets", "default", "';'-separated XLA_FLAGS for our side: 'default', 'none' or flags.")
    flags.DEFINE_string("peer_python", None, "Interpreter with torch and monai; default: .cache/monai-venv.")
    flags.DEFINE_bool("monai", True, "Run the MONAI peer.")
    flags.mark_flag_as_required("config")

    def run(argv):
        del argv
        FLAGS = flags.FLAGS
        config = _load_config(FLAGS.config)
        patch = FLAGS.patch or config.data.patch[0]
        widths = [int(w) for w in FLAGS.widths] if FLAGS.widths else list(config.model.widths)
        if patch % 2 ** (len(widths) - 1):
            raise SystemExit(f"--patch {patch} is not divisible by 2**{len(widths) - 1} (the network's downsampling)")
        base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        base_env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        workers = []
        try:
            for python in [sys.executable] + FLAGS.ours_python:
                for flag_set in FLAGS.xla_flag_sets.split(";"):
                    env = dict(base_env)
                    xla = os.environ.get("XLA_FLAGS", "") if flag_set == "default" else "" if flag_set == "none" else flag_set
                    if xla:
                        env["XLA_FLAGS"] = xla
                    if flag_set != "default":  # exactly these flags: not the package's own (segguided_jax.runtime)
                        env["SEGGUIDED_CPU_FLAGS"] = "none"
                    # Other interpreters and flag sets: the first dtype only, to keep the run short.
                    first = python == sys.executable and flag_set == FLAGS.xla_flag_sets.split(";")[0]
                    for dtype in FLAGS.dtypes if first else FLAGS.dtypes[:1]:
                        spec = {"config": FLAGS.config, "patch": patch, "widths": widths, "dtype": dtype,
                                "down_kernel": FLAGS.down_kernel}
                        name = f"ours {dtype}"
                        print(f"starting {name} under {python} (XLA_FLAGS={xla or '-'})", flush=True)
                        w = Worker(name, [python, os.path.abspath(__file__), "--worker", json.dumps(spec)], env)
                        short = w.info["xla_flags"].replace("--xla_cpu_", "") or "-"
                        w.label = f"{name} | py{w.info['python']} jax {w.info['jax']} | XLA_FLAGS: {short}"
                        workers.append(w)
            if FLAGS.monai:
                peer = ensure_peer_python(FLAGS.peer_python)
                for dtype in FLAGS.dtypes:
                    spec = {"patch": patch, "widths": widths, "batch": config.train.batch_size,
                            "down_kernel": FLAGS.down_kernel, "threads": FLAGS.threads, "dtype": dtype}
                    name = f"MONAI {dtype}" + (" autocast" if dtype == "bfloat16" else "")
                    print(f"starting {name} under {peer}", flush=True)
                    w = Worker(name, [peer, os.path.join(ROOT, "benchmarks", "monai_peer.py"), json.dumps(spec)], base_env)
                    w.label = (f"{name} | py{w.info['python']} torch {w.info['torch']} monai {w.info['monai']} | "
                               f"{w.info['threads']} threads")
                    workers.append(w)
            for r in range(FLAGS.rounds):
                for w in workers:
                    w.run(FLAGS.steps)
                print(f"round {r + 1}/{FLAGS.rounds}: " + ", ".join(
                    f"{w.name} {1000 * statistics.median(w.times[-FLAGS.steps:]):.0f} ms" for w in workers), flush=True)
        finally:
            for w in workers:
                w.close()

        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; batch "
              f"{config.train.batch_size} x {patch}^3 x 4 channels, widths {widths}, {FLAGS.down_kernel}^3 stride-2 "
              f"downsampling; medians over {FLAGS.rounds} x {FLAGS.steps} steps")
        # CPU ms: the worker's CPU time per step (all its threads), less sensitive than wall time
        # to other processes on a shared machine; spinning thread pools count in it too.
        print(f"{'variant':<84s} {'step ms':>8s} {'min ms':>8s} {'CPU ms':>8s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'params':>9s}")
        for w in workers:
            med = statistics.median(w.times)
            print(f"{w.label:<84s} {1000 * med:8.0f} {1000 * min(w.times):8.0f} {1000 * statistics.median(w.cpu):8.0f} "
                  f"{w.info['flops'] / 1e9:7.1f} {w.info['flops'] / 1e9 / med:8.1f} {w.info['params']:9d}")
        monai = {w.name.split()[1]: statistics.median(w.times) for w in workers if w.name.startswith("MONAI")}
        if "float32" in monai:
            for w in workers:
                if w.name.startswith("ours"):
                    med = statistics.median(w.times)
                    line = f"ratio ours/MONAI f32: {med / monai['float32']:.2f}"
                    if "bfloat16" in monai:
                        line += f", ours/MONAI bf16: {med / monai['bfloat16']:.2f}"
                    print(f"{line}  <- {w.label}")

    app.run(run)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        ours_worker(json.loads(sys.argv[2]))
    else:
        main()
