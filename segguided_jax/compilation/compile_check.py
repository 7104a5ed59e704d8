"""Compile the train step (and predict's window step) for a config without running it; print
what one device must hold and move.

    python -m segguided_jax.compile_check --config=configs/brats21.py [--devices 8] [--config.key=value ...]
    python -m segguided_jax.compile_check --config=configs/brats21.py --topology v5e:1x1 [--topology v5p:4x4x4 ...]
        [--batch_per_chip 2] [--max_batch] [--no_predict]

With --devices N on a CPU machine, N fake CPU devices stand in for the accelerators, so a user
learns before renting hardware what one device must hold (XLA's memory analysis of the compiled
step: arguments, outputs, temporaries) and how many bytes each step all-reduces between devices.
CPU figures approximate an accelerator's: its compiler fuses and lays out differently.

With --topology NAME (e.g. v5e:1x1, v5e:2x2, v5p:2x2x1, v5p:4x4x4, v6e:2x2) the real TPU compiler
(libtpu, on this machine's CPU: no TPU needed) compiles the same jitted, sharded step
(steps.sharded_steps) for every chip of that slice, all hosts included, and one table row per
topology gives per chip: peak HBM against the chip's capacity (fits or not; --max_batch: the
largest batch that fits, found by compiling), FLOPs, bytes accessed, bytes moved by collectives
(all-reduce; collective-permute: the spatial axis's halos), XLA's cost-model step time where it is
valid, and a roofline estimate (max of FLOPs at the chip's bf16 peak and bytes at its HBM
bandwidth, plus the collectives' bytes at its ICI bandwidth, not overlapped) that exists for every
row, so that rows compare. The batch is --batch_per_chip (default: the config's train.batch_size)
per data-parallel slot, so several topologies give the weak-scaling table. predict's window step
(inference.window_function: one batch of config.eval.batch_size windows per slot, predict's
default 8 mirrorings, the finest attention stage) is compiled the same way.

With --gpu h100|h200|a100 [--gpu_topology 1x1x1 --gpu_topology 1x1x8 --gpu_topology 1x2x8 ...] JAX's
CUDA plugin compiles the same step for that many GPUs on N hosts ("<slices>x<hosts>x<GPUs per host>"),
no GPU needed (segguided_jax.compilation.gpu_compile). One row per topology and function gives per GPU: peak
memory against the card's (fits; --max_batch), FLOPs and bytes counted from the optimised program,
the collectives' bytes with their time (one ring at NVLink, one ring at InfiniBand, and NCCL's
hierarchy: NVLink within a node, each GPU's share over its own NIC across nodes), how many
kernels the schedule places between each asynchronous collective's start and done, and a roofline
estimate (the kernels at the bf16 peak or HBM bandwidth, plus the collective time they leave
exposed); under each row, the program's census (cuDNN convolutions
by kind, Triton and other fusions, transposes, copies, each with the bytes it writes and its time at
the roofline). --hlo_dir writes each optimised program's text.

libtpu serves one process at a time: every TPU compile holds LIBTPU_LOCK and queues on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import fcntl
import os
import platform
import re
import signal
import sys
import time

LIBTPU_LOCK = "/tmp/segguided-libtpu.lock"


def _early_devices(argv) -> None:
    # The fake-device flag must reach XLA before JAX starts its CPU backend (at first use, not at
    # import), so it is read from argv before absl parses the flags.
    for i, a in enumerate(argv):
        if a.startswith("--devices"):
            n = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


def libtpu_path() -> str | None:
    """The libtpu.so to compile with: launch/env.sh's copy beside the venv (<venv>/libtpu, off the
    import path so CPU runs never load a TPU plugin), else an installed libtpu package (a TPU VM)."""
    beside = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    if os.path.isfile(beside):
        return beside
    import importlib.util
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        found = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
        return found if os.path.isfile(found) else None
    return None


def libtpu_unavailable() -> str | None:
    """Why TPU compiles cannot run here, or None when they can."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        return f"libtpu runs on x86-64 Linux only, not {platform.system()} {platform.machine()}"
    if libtpu_path() is None:
        return (f"libtpu is not installed (`SEGGUIDED_DEVICELESS=1 source launch/env.sh` puts it at "
                f"{os.path.join(sys.prefix, 'libtpu')}, as the test command does; its install log is .venv/install.log)")
    return None


def _accelerator_type(topology: str) -> str:
    # The Cloud TPU name of a slice, e.g. v5e:2x2 -> v5litepod-4, v5p:2x2x1 -> v5p-8 (cores).
    gen, shape = topology.split(":")
    chips = 1
    for n in shape.split("x"):
        chips *= int(n)
    return {"v5e": f"v5litepod-{chips}", "v5p": f"v5p-{2 * chips}", "v4": f"v4-{2 * chips}"}.get(gen, f"{gen}-{chips}")


def prepare_tpu_environment(topology: str) -> None:
    """Points JAX at libtpu for deviceless compiles; call before JAX starts. JAX itself stays on
    the CPU platform; only topologies.get_topology_desc loads libtpu."""
    reason = libtpu_unavailable()
    if reason:
        raise RuntimeError(f"cannot compile for TPU topology {topology}: {reason}")
    os.environ["TPU_LIBRARY_PATH"] = libtpu_path()
    os.environ["JAX_PLATFORMS"] = "cpu"
    # Off a TPU VM there is no metadata server to ask for the slice; without these libtpu asks
    # anyway and prints warnings. They describe the local host only: the compile's topology is the
    # one passed to get_topology_desc.
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")


def _lock_holders(fd: int) -> set[int]:
    """Process ids holding a flock on fd's file, from /proc/locks."""
    inode = os.fstat(fd).st_ino
    holders = set()
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                holders.add(int(parts[4]))
    return holders


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


@contextlib.contextmanager
def libtpu_lock(timeout_s: float, path: str = LIBTPU_LOCK):
    """Holds LIBTPU_LOCK (what `flock /tmp/segguided-libtpu.lock CMD` takes too), queueing behind
    other processes for up to timeout_s; raises TimeoutError naming the holder after that. A lock
    held by one of this process's ancestors (a command run under flock) counts as ours. Call from
    the main thread (the wait is bounded by SIGALRM)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _lock_holders(fd)
            if not holders & _ancestors():
                print(f"waiting for libtpu: {path} is held by process(es) {sorted(holders)}", flush=True)
                _wait_for_lock(fd, timeout_s, holders, path)
        yield
    finally:
        os.close(fd)


def _wait_for_lock(fd: int, timeout_s: float, holders, path: str) -> None:
    # A blocking flock queues with the other waiters (polling would lose every release to them).
    def expired(signum, frame):
        raise TimeoutError(f"libtpu is in use: {path} has been held by process(es) {sorted(holders)} "
                           f"for more than {timeout_s:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


import jax  # noqa: E402  (after the environment helpers above, which must run before JAX starts)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from segguided_jax import config_schema  # noqa: E402
from segguided_jax.compilation import gpu_compile  # noqa: E402
from segguided_jax.parallel import sharding  # noqa: E402
from segguided_jax.models.network import abstract_model, parameter_count  # noqa: E402
from segguided_jax.training.steps import abstract_batch, sharded_steps  # noqa: E402

COLLECTIVES = ("all-reduce", "collective-permute", "all-gather", "reduce-scatter", "all-to-all")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's public figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the
    per-generation pages): HBM capacity, HBM bandwidth, bf16 peak, ICI bandwidth (all links)."""
    name: str
    hbm_gib: float
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    ici_bytes_per_s: float


CHIPS = {  # by jax's device_kind
    "TPU v5 lite": Chip("v5e", 16, 819e9, 197e12, 1600e9 / 8),
    "TPU v5": Chip("v5p", 95, 2765e9, 459e12, 4800e9 / 8),
    "TPU v6 lite": Chip("v6e", 32, 1640e9, 918e12, 3584e9 / 8),
    "TPU v4": Chip("v4", 32, 1200e9, 275e12, 2400e9 / 8),
}


def collective_bytes(hlo_text: str, op: str = "all-reduce") -> int:
    """Bytes of the results of every `op` collective (e.g. all-reduce, collective-permute) in an
    optimised HLO module: one device's share. An asynchronous pair counts once, at its -done (a
    -start's result also holds the operands and a context)."""
    pattern = re.compile(rf"= (.*?) {re.escape(op)}(-done)?\(")
    return sum(gpu_compile.shape_bytes(m.group(1)) for line in hlo_text.splitlines() if (m := pattern.search(line)))


def all_reduce_bytes(hlo_text: str) -> int:
    """Bytes of the results of every all-reduce in an optimised HLO module (one device's share)."""
    return collective_bytes(hlo_text, "all-reduce")


def compile_train_step(config, mesh=None):
    """Lowers and compiles the jitted train step on abstract inputs for a mesh (default: every
    device, as config.mesh says). Returns the compiled step; a config that cannot work raises
    config_schema.ConfigError first."""
    derived = config_schema.validate(config)
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    sharding.check_batch(config.train.batch_size, config.data.patch, mesh, derived.size_divisor)
    fns = sharded_steps(config, mesh)
    return fns.step.lower(fns.abstract, abstract_batch(config, mesh)).compile()


def compile_predict_windows(config, mesh, windows: int, mirror_axes=(0, 1, 2)):
    """Compiles predict's window step (inference.window_function, as VolumePredictor jits it) for
    `windows` windows of config.eval.window over the mesh, float32 parameters as a checkpoint
    holds them. Returns the compiled function."""
    import jax.numpy as jnp
    from flax import nnx

    from segguided_jax.inference.predictor import window_function
    from segguided_jax.models.network import forward
    graphdef, params = nnx.split(abstract_model(config.model), nnx.Param)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding.replicated(mesh)),
                          params)
    fn = window_function(functools.partial(forward, graphdef, output=config.model.output), mesh,
                         mirror_axes=mirror_axes, attention_stages=(-1,) if config.model.gates else ())
    x = jax.ShapeDtypeStruct((windows,) + tuple(config.eval.window) + (config.model.in_channels,), jnp.float32,
                             sharding=sharding.batch_sharding(mesh))
    return fn.lower(params, x).compile()


@dataclasses.dataclass
class Figures:
    """One compiled function on one topology, per chip."""
    topology: str
    what: str  # "train" or "predict"
    chips: int
    hosts: int
    data: int
    spatial: int
    batch: int  # samples (train) or windows (predict) per data-parallel slot
    chip: Chip | None
    error: str | None = None  # the compiler's refusal (e.g. out of HBM)
    peak: float = 0.0
    temporaries: float = 0.0
    arguments: float = 0.0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    cost_model_s: float | None = None  # XLA's estimate, when it gave a positive one
    collectives: dict = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.error is None and (self.chip is None or self.peak <= self.chip.hbm_gib * GIB)

    @property
    def per_chip_samples(self) -> float:
        return self.batch / self.spatial

    def roofline_s(self) -> float | None:
        """max(FLOPs at bf16 peak, bytes at HBM bandwidth) + collective bytes at ICI bandwidth."""
        if self.chip is None or self.error:
            return None
        compute = max(self.flops / self.chip.bf16_flops_per_s, self.bytes_accessed / self.chip.hbm_bytes_per_s)
        return compute + self.ici_s()

    def ici_s(self) -> float:
        return sum(self.collectives.values()) / self.chip.ici_bytes_per_s if self.chip else 0.0


def measure(compiled, **fields) -> Figures:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hlo = compiled.as_text()
    optimal = cost.get("optimal_seconds")
    return Figures(
        **fields, peak=float(getattr(mem, "peak_memory_in_bytes", 0) or (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)),
        temporaries=float(mem.temp_size_in_bytes), arguments=float(mem.argument_size_in_bytes),
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        cost_model_s=float(optimal) if optimal is not None and optimal > 0 else None,
        collectives={op: b for op in COLLECTIVES if (b := collective_bytes(hlo, op))})


def _out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "HbmOom" in text or "exceeds available HBM" in text


def topology_devices(name: str):
    from jax.experimental import topologies

    from segguided_jax.models import formulations

    formulations.may_lower_for("tpu")  # what is traced from now on may run on these chips
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


def compile_for_topology(config, topology: str, batch: int, what: str = "train", mirror_axes=(0, 1, 2)) -> Figures:
    """Compiles the train step (what="train": batch samples per data slot) or predict's window
    step (what="predict": batch windows per data slot) for a TPU topology. A compile the TPU
    compiler refuses for lack of HBM returns Figures with .error set; other errors raise."""
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    data, spatial = mesh.shape[sharding.DATA_AXIS], mesh.shape[sharding.SPATIAL_AXIS]
    fields = dict(topology=topology, what=what, chips=len(devices), hosts=len({d.process_index for d in devices}),
                  data=data, spatial=spatial, batch=batch, chip=CHIPS.get(devices[0].device_kind))
    config = config.copy_and_resolve_references()
    try:
        if what == "train":
            config.train.batch_size = batch * data
            compiled = compile_train_step(config, mesh)
        else:
            compiled = compile_predict_windows(config, mesh, batch * data, mirror_axes)
    except Exception as e:  # noqa: BLE001 (only running out of HBM is an answer; the rest re-raise)
        if not _out_of_memory(e):
            raise
        return Figures(**fields, error=" ".join(str(e).split())[:300])
    return measure(compiled, **fields)


def largest_batch(config, topology: str, start: Figures) -> tuple[int, list[Figures]]:
    """The largest per-slot train batch that compiles within the chip's HBM, found by compiling:
    a linear guess from start's per-sample temporaries, then one step at a time to the boundary.
    Returns (batch, every Figures compiled on the way); batch 0 when even 1 does not fit."""
    return search_batch(lambda b: compile_for_topology(config, topology, b), start.chip.hbm_gib * GIB, start)


def search_batch(compile_at, capacity: float, start) -> tuple[int, list]:
    """largest_batch's search for any device: compile_at(batch) gives figures with .fits, .peak,
    .temporaries and .batch; capacity is the device's memory in bytes. The first guess follows
    from start's temporaries per sample; from it, steps doubling away bracket the boundary and a
    bisection closes it: a few compiles, however large the batch (a small model's can be
    thousands, where a linear estimate off by 1 % is tens of batches off)."""
    tried = {start.batch: start}
    if start.fits:
        per_sample = max(start.temporaries / start.batch, 1.0)
        guess = max(start.batch + int((capacity - start.peak) // per_sample), start.batch)
    else:
        guess = max(start.batch - 1, 1)

    def fits(b):
        if b not in tried:
            tried[b] = compile_at(b)
        return tried[b].fits

    step = max(1, guess // 64)
    if fits(guess):  # lo fits; find an hi that does not
        lo, hi = guess, guess + step
        while fits(hi):
            lo, step = hi, step * 2
            hi = lo + step
    else:  # hi does not fit; find a lo that does (0: not even one)
        hi, lo = guess, guess - step
        while lo >= 1 and not fits(lo):
            hi, step = lo, step * 2
            lo = hi - step
        lo = max(lo, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, list(tried.values())


def compile_for_gpus(config, card: gpu_compile.Gpu, topology: str, batch: int, what: str = "train",
                     mirror_axes=(0, 1, 2), hlo_dir: str | None = None) -> gpu_compile.GpuFigures:
    """The train step (batch samples per data slot) or predict's window step (batch windows per
    slot) compiled for a topology of `card`s, through the mesh and step that train runs.
    hlo_dir: where to write the optimised program's text as well."""
    devices = gpu_compile.gpu_devices(card, topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    data, spatial = mesh.shape[sharding.DATA_AXIS], mesh.shape[sharding.SPATIAL_AXIS]
    config = config.copy_and_resolve_references()
    if what == "train":
        config.train.batch_size = batch * data
        compiled = compile_train_step(config, mesh)
    else:
        compiled = compile_predict_windows(config, mesh, batch * data, mirror_axes)
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{card.key}_{topology}_{what}_b{batch}.hlo.txt"), "w") as f:
            f.write(hlo)
    return gpu_compile.GpuFigures(
        card=card, topology=topology, what=what, gpus=len(devices), hosts=len({d.process_index for d in devices}),
        data=data, spatial=spatial, batch=batch, peak=float(mem.peak_memory_in_bytes),
        temporaries=float(mem.temp_size_in_bytes), arguments=float(mem.argument_size_in_bytes),
        census=gpu_compile.census(hlo))


GPU_TABLE_HEAD = ("| GPU | topology | GPUs (hosts) | mesh data×spatial | step | batch per GPU | peak per GPU GiB "
                  "(temporaries) | fits | FLOPs per GPU | bytes accessed per GPU GiB | collectives per GPU MiB "
                  "(ms: one ring at NVLink / at IB / hierarchical) | async collectives (kernels between start and done) | "
                  "roofline + exposed all-reduce | patches/s per GPU | vs first row |")


def _gpu_row(r: gpu_compile.GpuFigures, first: dict) -> str:
    unit = "patches" if r.what == "train" else "windows"
    c = r.census
    reduced = sum(c.collective_bytes.values())
    coll = "0"
    if reduced:
        coll = (f"{reduced / 2**20:.4g} ({r.collective_s(r.card.nvlink_bytes_per_s) * 1e3:.2f} / "
                f"{r.collective_s(r.card.ib_bytes_per_s) * 1e3:.2f} / {r.hierarchical_s() * 1e3:.2f})")
    est = r.estimate_s()
    ref = first.setdefault(r.what, est)
    return (f"| {r.card.key} | {r.topology} | {r.gpus} ({r.hosts}) | {r.data}×{r.spatial} | {r.what} | "
            f"{r.per_gpu_samples:g} | {_gib(r.peak)} of {_gib(r.card.memory_bytes)} ({_gib(r.temporaries)}) | "
            f"{'yes' if r.fits else 'no'} | {c.flops / 1e12:.3g} T | {_gib(c.bytes_accessed)} | {coll} | "
            f"{c.async_collectives} of {c.collectives} ({c.overlapped_kernels}) | {est * 1e3:.1f} ms | "
            f"{r.per_gpu_samples / est:.1f} {unit} | {est / ref:.2f}× |")


def _print_gpu(config, card: gpu_compile.Gpu, topologies: list, batch: int, max_batch: bool, no_predict: bool,
               hlo_dir: str | None) -> None:
    print(f"{card.name}: {card.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16 dense, {card.hbm_bytes_per_s / 1e12:.2f} "
          f"TB/s, {_gib(card.memory_bytes)} GiB, NVLink {card.nvlink_bytes_per_s / 1e9:.0f} GB/s, IB "
          f"{card.ib_bytes_per_s * 8 / 1e9:.0f} Gb/s per GPU. Deviceless: no autotuning (cuDNN algorithms and "
          "Triton tiles are defaults), no cost model: FLOPs and bytes are counted from the program.", flush=True)
    print(GPU_TABLE_HEAD + "\n|" + "---|" * (GPU_TABLE_HEAD.count("|") - 1), flush=True)
    first = {}
    for name in topologies:
        t = time.perf_counter()
        steps = [("train", batch)] + ([] if no_predict else [("predict", config.eval.batch_size)])
        for what, b in steps:
            row = compile_for_gpus(config, card, name, b, what, hlo_dir=hlo_dir)
            print(_gpu_row(row, first), flush=True)
            print(f"  {name} {what} census (kernels (MiB written; ms at the roofline)): {row.census.line(card)}",
                  flush=True)
            if what == "train" and max_batch:
                best, tried = search_batch(lambda n: compile_for_gpus(config, card, name, n), card.memory_bytes, row)
                print(f"{name}: largest train batch per GPU that fits: {best} (compiled: "
                      + ", ".join(f"{f.batch} {'fits' if f.fits else 'does not fit'}"
                                  for f in sorted(tried, key=lambda f: f.batch)) + ")", flush=True)
        print(f"{name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}" if x >= GIB else f"{x / GIB:.3g}"


def table(rows: list[Figures]) -> str:
    """The rows as a markdown table; the last column compares each row's estimate with the first
    row's of the same function (weak scaling at a fixed batch per chip)."""
    head = TABLE_HEAD
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    first = {}
    for r in rows:
        lines.append(_row(r, first))
    return "\n".join(lines)


TABLE_HEAD = ("| topology | chips (hosts) | mesh data×spatial | step | batch per chip | peak HBM per chip GiB "
              "(temporaries) | fits | FLOPs per chip | bytes accessed per chip GiB (per sample) | collectives per "
              "chip MiB | cost model | roofline + ICI | patches/s per chip | vs first row |")


def _row(r: Figures, first: dict) -> str:
    """One table row; first holds the first row's roofline estimate per function."""
    unit = "patches" if r.what == "train" else "windows"
    if r.error:
        return (f"| {r.topology} | {r.chips} ({r.hosts}) | {r.data}×{r.spatial} | {r.what} | "
                f"{r.per_chip_samples:g} | — | no: {r.error} | | | | | | | |")
    cap = f" of {r.chip.hbm_gib:g}" if r.chip else ""
    coll = ", ".join(f"{op} {b / 2**20:.1f}" for op, b in r.collectives.items()) or "0"
    if r.chip and r.collectives:
        coll += f" ({r.ici_s() * 1e3:.1f} ms at ICI)"
    cm = f"{r.cost_model_s * 1e3:.1f} ms" if r.cost_model_s else "not valid"
    roof = r.roofline_s()
    rate = r.per_chip_samples / (r.cost_model_s or roof) if (r.cost_model_s or roof) else None
    basis = "" if r.cost_model_s else " (roofline)"
    ref = first.setdefault(r.what, roof)
    return (
        f"| {r.topology} | {r.chips} ({r.hosts}) | {r.data}×{r.spatial} | {r.what} | {r.per_chip_samples:g} | "
        f"{_gib(r.peak)}{cap} ({_gib(r.temporaries)}) | {'yes' if r.fits else 'no'} | {r.flops / 1e12:.2f} T | "
        f"{_gib(r.bytes_accessed)} ({_gib(r.bytes_accessed / r.per_chip_samples)}) | {coll} | {cm} | "
        f"{roof * 1e3:.1f} ms | " + (f"{rate:.1f} {unit}{basis}" if rate else "—") + " | "
        + (f"{roof / ref:.2f}×" if roof and ref else "—") + " |")


def _print_cpu(config) -> None:
    compiled = compile_train_step(config)
    mem = compiled.memory_analysis()
    n = jax.device_count()
    print(f"{jax.devices()[0].platform} x{n} devices, mesh data={config.mesh.data} spatial={config.mesh.spatial}; "
          f"batch {config.train.batch_size} x {tuple(config.data.patch)}, {config.model.compute_dtype}; "
          f"{parameter_count(abstract_model(config.model))} parameters")
    if mem is not None:
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        print(f"per device: arguments {mem.argument_size_in_bytes / GIB:.2f} GiB, outputs "
              f"{mem.output_size_in_bytes / GIB:.2f} GiB (aliased {mem.alias_size_in_bytes / GIB:.2f}), temporaries "
              f"{mem.temp_size_in_bytes / GIB:.2f} GiB, code {mem.generated_code_size_in_bytes / 2**20:.1f} MiB; "
              f"peak about {total / GIB:.2f} GiB")
    print(f"all-reduced per step, per device: {all_reduce_bytes(compiled.as_text()) / 2**20:.1f} MiB")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config = FLAGS.config
    try:
        config_schema.validate(config)
    except config_schema.ConfigError as e:
        sys.exit(f"error: {e}")
    if FLAGS.gpu:
        jax.config.update("jax_enable_compilation_cache", False)  # as for TPU below
        m = config.model
        print(f"jax {jax.__version__}, CUDA plugin at {gpu_compile.cuda_plugin_dir()}; patch {tuple(config.data.patch)}, "
              f"widths {tuple(m.widths)}, {m.compute_dtype}, {parameter_count(abstract_model(m))} parameters", flush=True)
        try:
            card = gpu_compile.GPUS[FLAGS.gpu].with_memory(FLAGS.gpu_memory_gib)
        except ValueError as e:
            sys.exit(f"error: {e}")
        _print_gpu(config, card, FLAGS.gpu_topology or ["1x1x1"], FLAGS.batch_per_chip or config.train.batch_size,
                   FLAGS.max_batch, FLAGS.no_predict, FLAGS.hlo_dir)
        return
    if not FLAGS.topology:
        _print_cpu(config)
        return
    # A deviceless executable is not worth caching, and reading one back would skip the compile
    # whose figures are asked for.
    jax.config.update("jax_enable_compilation_cache", False)
    batch = FLAGS.batch_per_chip or config.train.batch_size
    m = config.model
    print(f"jax {jax.__version__}, libtpu at {libtpu_path()}; patch {tuple(config.data.patch)}, widths "
          f"{tuple(m.widths)}, {m.compute_dtype}, {parameter_count(abstract_model(m))} parameters; mesh.spatial="
          f"{config.mesh.spatial}; predict: {config.eval.batch_size} windows of {tuple(config.eval.window)} "
          f"per slot, 8 mirrorings", flush=True)
    rows, first = [], {}

    def add(row):  # each row as soon as it is compiled (a brats21 compile takes minutes)
        rows.append(row)
        print(_row(row, first), flush=True)

    print(TABLE_HEAD + "\n|" + "---|" * (TABLE_HEAD.count("|") - 1), flush=True)
    with libtpu_lock(FLAGS.lock_timeout):
        for name in FLAGS.topology:
            t = time.perf_counter()
            row = compile_for_topology(config, name, batch)
            add(row)
            if FLAGS.max_batch and row.chip is not None:
                best, tried = largest_batch(config, name, row)
                print(f"{name}: largest train batch per chip that fits: {best} (compiled: "
                      + ", ".join(f"{f.batch} {'fits' if f.fits else 'does not fit'}"
                                  for f in sorted(tried, key=lambda f: f.batch)) + ")", flush=True)
            if not FLAGS.no_predict:
                add(compile_for_topology(config, name, config.eval.batch_size, what="predict"))
            print(f"{name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
    if len(rows) > 2:
        print(table(rows))


def run(argv) -> None:
    """The command (segguided_jax.compile_check): its flags are defined only here, so importing
    this module (tests, tools) does not clash with the training command's --config. With --gpu the
    command prepares the GPU environment before this module imports JAX."""
    _early_devices(argv)
    _topologies = [a.split("=", 1)[1] if "=" in a else argv[i + 1]
                   for i, a in enumerate(argv) if a.startswith("--topology")]
    if _topologies:
        prepare_tpu_environment(_topologies[0])
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_integer("devices", None, "Fake CPU devices to compile for (read before JAX starts).")
    flags.DEFINE_multi_string("topology", [], "TPU topologies to compile for with libtpu, e.g. v5e:1x1 v5p:4x4x4.")
    flags.DEFINE_enum("gpu", None, sorted(gpu_compile.GPUS), "Compile for this NVIDIA GPU with JAX's CUDA plugin.")
    flags.DEFINE_multi_string("gpu_topology", [], "GPU topologies: <slices>x<hosts>x<GPUs per host>, e.g. 1x1x8, 1x2x8.")
    flags.DEFINE_float("gpu_memory_gib", None, "With --gpu: compile for the card with this much memory (a MIG "
                       "slice, a smaller part); fits and --max_batch measure against it.")
    flags.DEFINE_string("hlo_dir", None, "With --gpu: also write each optimised GPU program's text here.")
    flags.DEFINE_integer("batch_per_chip", None, "Train samples per data-parallel slot (default: train.batch_size).")
    flags.DEFINE_bool("max_batch", False, "Also find the largest train batch per chip that fits, by compiling.")
    flags.DEFINE_bool("no_predict", False, "Skip predict's window step.")
    flags.DEFINE_float("lock_timeout", 3600, "Seconds to wait for another process's libtpu compile to finish.")
    flags.mark_flag_as_required("config")
    app.run(main)
