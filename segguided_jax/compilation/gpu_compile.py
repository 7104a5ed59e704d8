"""Compiling for NVIDIA GPUs on a machine without one, and reading the optimised GPU program.

JAX's CUDA plugin compiles for a GPU described by a GpuTargetConfig (the card's SM count, shared
memory, bandwidth, compute capability: segguided_jax/compilation/gpu_targets/*.txtpb) and a topology
"<slices>x<hosts per slice>x<GPUs per host>" ("1x1x8": one node of 8; "1x2x8": two nodes, two
processes), with no driver and no GPU: jax.experimental.topologies.get_topology_desc(platform="cuda",
...). One process compiles the whole multi-host program. What comes back is final in memory,
fusions, layouts and collectives; kernel choices are not (autotuning needs a device: cuDNN
algorithms are left at -1 with no workspace, every GEMM goes to Triton with default tiles), and
the compiler gives no cost analysis, so FLOPs and bytes are counted here from the program.

The plugin is installed beside the venv, not into it (`SEGGUIDED_DEVICELESS=1 source
launch/env.sh`, which the test command does: <venv>/cuda, from lock/cuda.txt), as libtpu is: JAX on a CPU machine must not find a CUDA plugin at start-up. Its
own ptxas (the nvidia-cuda-nvcc-cu12 wheel) comes with it, so the compile does not depend on a
CUDA toolkit on the machine.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import os
import re
import sys

GIB = 2 ** 30
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "s8": 1,
                "u8": 1, "pred": 1, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One data-centre GPU (SXM part) by its public figures: dense bf16 peak and memory bandwidth
    from NVIDIA's datasheets; NVLink bandwidth per GPU per direction; the InfiniBand a node gives
    each GPU (one NIC per GPU, as in DGX/HGX nodes). Memory size is the target config's, unless
    memory_gib gives another (a MIG slice, a smaller part of the same chip: with_memory)."""
    name: str
    target: str  # file in segguided_jax/compilation/gpu_targets
    bf16_flops_per_s: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    ib_bytes_per_s: float
    memory_gib: float | None = None

    def with_memory(self, gib: float | None) -> "Gpu":
        """The same chip with `gib` GiB of memory (None: the card's own): XLA compiles for it, and
        fits and --max_batch measure against it."""
        if gib is None:
            return self
        if gib <= 0:
            raise ValueError(f"--gpu_memory_gib {gib}: must be positive")
        return dataclasses.replace(self, name=f"{self.name} with {gib:g} GiB", memory_gib=float(gib))

    @property
    def key(self) -> str:
        """The card's name in GPUS and on the command line (h100, h200, a100)."""
        return self.target.split(".")[0]

    def target_config(self) -> str:
        text = importlib.resources.files("segguided_jax.compilation.gpu_targets").joinpath(self.target).read_text()
        if self.memory_gib is not None:
            text = re.sub(r"device_memory_size: \d+", f"device_memory_size: {self.memory_bytes}", text)
        return text

    @property
    def memory_bytes(self) -> int:
        if self.memory_gib is not None:
            return int(self.memory_gib * GIB)
        return int(re.search(r"device_memory_size: (\d+)", self.target_config()).group(1))


GPUS = {
    "h100": Gpu("H100 SXM 80GB", "h100.txtpb", 989e12, 3.35e12, 450e9, 400e9 / 8),
    "h200": Gpu("H200 SXM 141GB", "h200.txtpb", 989e12, 4.8e12, 450e9, 400e9 / 8),
    "a100": Gpu("A100 SXM 80GB", "a100.txtpb", 312e12, 2.039e12, 300e9, 200e9 / 8),
}


def cuda_plugin_dir() -> str:
    """Where launch/env.sh installs the CUDA plugin and its ptxas: <venv>/cuda."""
    return os.path.join(sys.prefix, "cuda")


def cuda_unavailable() -> str | None:
    """Why GPU compiles cannot run here, or None when they can."""
    import platform
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        return f"the CUDA plugin's wheels are for x86-64 Linux, not {platform.system()} {platform.machine()}"
    if not os.path.isdir(os.path.join(cuda_plugin_dir(), "jax_plugins")):
        return (f"the CUDA plugin is not installed (`SEGGUIDED_DEVICELESS=1 source launch/env.sh` puts it at "
                f"{cuda_plugin_dir()}, as the test command does; its install log is .venv/install.log)")
    return None


def prepare_gpu_environment() -> None:
    """Makes the CUDA plugin importable for deviceless compiles; call before JAX is imported (it
    locates ptxas then). JAX itself stays on the CPU platform: only get_topology_desc talks to the
    plugin, and the CUDA constraints check (which wants a driver and cuDNN) is skipped."""
    reason = cuda_unavailable()
    if reason:
        raise RuntimeError(f"cannot compile for GPUs: {reason}")
    if "jax" in sys.modules:
        raise RuntimeError("prepare_gpu_environment() must run before JAX is imported")
    if cuda_plugin_dir() not in sys.path:
        sys.path.insert(0, cuda_plugin_dir())
    # ptxas and libdevice of the locked nvidia-cuda-nvcc-cu12 wheel, not whatever CUDA toolkit the
    # machine has (jax reads CUDA_ROOT at import and passes it to XLA as its CUDA data dir).
    os.environ["CUDA_ROOT"] = os.path.join(cuda_plugin_dir(), "nvidia", "cuda_nvcc")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def gpu_devices(gpu, topology: str):
    """The devices of `topology` (e.g. "1x1x1", "1x1x8", "1x2x8") of a card: a Gpu, or a name in
    GPUS."""
    from jax.experimental import topologies

    from segguided_jax.models import formulations

    formulations.may_lower_for("cuda")  # what is traced from now on may run on these GPUs
    card = GPUS[gpu] if isinstance(gpu, str) else gpu
    return topologies.get_topology_desc(platform="cuda", target_config=card.target_config(),
                                        topology=topology).devices


# ---- the optimised program --------------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
# Instructions that move no data of their own (views, tuples, scalars) or whose bytes count at
# their other half (an asynchronous collective counts at its -start).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done",
         "async-done", "opt-barrier", "iota"}


def shape_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's included); an unknown element type counts 4."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _first_shape(shape_text: str) -> str:
    """A cuDNN or cuBLAS call returns (result, workspace): the result only."""
    if shape_text.startswith("("):
        m = re.match(r"\(([a-z]+\d*[a-z0-9]*\[[\d,]*\](?:\{[^}]*\})?)", shape_text)
        return m.group(1) if m else shape_text
    return shape_text


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list
    attrs: str

    @property
    def out_bytes(self) -> int:
        return shape_bytes(_first_shape(self.shape)) if self.op == "custom-call" else shape_bytes(self.shape)


def _split_operands(rest: str) -> tuple[list, str]:
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    inside, attrs = rest[:i - 1], rest[i:]
    return re.findall(r"%([\w.\-]+)", inside), attrs


def parse(hlo_text: str) -> tuple[dict, list[Instr]]:
    """(every computation's instructions by name, the instructions of the program's schedule in
    order: the entry computation's, and those of while loops and conditionals it runs; fusion
    bodies and reducers are not kernels of their own)."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            current = comps.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            operands, attrs = _split_operands(m.group(4))
            current.append(Instr(m.group(1), m.group(2), m.group(3), operands, attrs))
    out, seen = [], set()

    def walk(name):
        if name in seen or name not in comps:
            return
        seen.add(name)
        for ins in comps[name]:
            if ins.op in ("while", "conditional", "call"):
                for callee in re.findall(r"(?:body|condition|to_apply|branch_computations=\{[^}]*)=?%([\w.\-]+)",
                                         ins.attrs):
                    walk(callee)
            out.append(ins)

    walk(entry)
    return comps, out


def _kind(ins: Instr) -> str | None:
    """The census category of one scheduled instruction, or None for one that is no kernel."""
    if ins.op in _FREE:
        return None
    if ins.op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        target = target.group(1) if target else ""
        if target.startswith("__cudnn$conv"):
            if "BackwardInput" in target:
                return "cuDNN conv backward-input"
            if "BackwardFilter" in target:
                return "cuDNN conv backward-filter"
            return "cuDNN conv forward"
        if target.startswith("__cublas") or target.startswith("__cudnn"):
            return f"library call {target}"
        return f"custom-call {target}"
    if ins.op == "fusion":
        if '"kind":"__triton' in ins.attrs:
            return "Triton fusion"
        if "transpose" in ins.name:
            return "transpose fusion"
        return "other fusion"
    if ins.op in ("copy", "copy-start"):
        return "copy"
    if ins.op == "transpose":
        return "transpose fusion"
    if ins.op.startswith(("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")):
        return ins.op.replace("-start", "")
    return f"other {ins.op}"


@dataclasses.dataclass
class Census:
    """The optimised GPU program, kernel by kernel: how many of each kind and the bytes they write
    (and read), the FLOPs of its convolutions and GEMMs, its collectives and how the schedule
    places them."""
    count: dict
    written: dict  # bytes written per kind (the kernels' results)
    bytes_accessed: float  # every kernel's operands read plus its result written
    flops: float
    collective_bytes: dict  # result bytes per collective kind (one device's share)
    async_collectives: int
    collectives: int
    compute_kernels: int
    windows: list  # per collective: (bytes, kernels scheduled between its start and done; None if sync)
    kernels: list  # (kind, FLOPs, bytes read and written) of every kernel but the collectives, in order

    @property
    def overlapped_kernels(self) -> int:
        """Kernels scheduled between the asynchronous collectives' starts and their dones."""
        return sum(k for _, k in self.windows if k)

    def time_by_kind(self, gpu: Gpu) -> dict:
        """Seconds per kind at the roofline: each kernel bound by its FLOPs at the bf16 peak or by
        its bytes at HBM bandwidth (kernels run one after another), summed."""
        t = collections.Counter({k: 0.0 for k in self.count})
        for kind, flops, moved in self.kernels:
            t[kind] += max(flops / gpu.bf16_flops_per_s, moved / gpu.hbm_bytes_per_s)
        return dict(t)

    def roofline_s(self, gpu: Gpu) -> float:
        return sum(self.time_by_kind(gpu).values())

    def line(self, gpu: Gpu) -> str:
        """Per kind: kernels (MiB they write; ms at the roofline on gpu)."""
        order = ["cuDNN conv forward", "cuDNN conv backward-input", "cuDNN conv backward-filter", "Triton fusion",
                 "other fusion", "transpose fusion", "copy"]
        kinds = order + sorted(k for k in self.count if k not in order)
        t = self.time_by_kind(gpu)
        return ", ".join(f"{k} {self.count[k]} ({self.written[k] / 2**20:.0f} MiB; {t[k] * 1e3:.2f} ms)"
                         for k in kinds if self.count.get(k))


def _dims(shape_text: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", _first_shape(shape_text))
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _conv_flops(ins: Instr, shapes: dict) -> float:
    """2 x the multiply-adds of a cuDNN convolution, from the shapes of its result and operands.
    Forward: every result element sums C_in/groups x kernel volume products. The two backward
    convolutions do as many as the forward one whose gradient they take: output-gradient elements
    (batch x output voxels) x C_out x C_in/groups x kernel volume."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    target = re.search(r'custom_call_target="([^"]+)"', ins.attrs).group(1)
    if not labels or len(ins.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    a, b = _dims(shapes.get(ins.operands[0], "")), _dims(shapes.get(ins.operands[1], ""))
    result = _dims(ins.shape)
    if "BackwardFilter" in target:  # operands (input, output grad) -> kernel
        kernel, out = dict(zip(rhs_l, result)), dict(zip(out_l, b))
    elif "BackwardInput" in target:  # operands (output grad, kernel) -> input grad
        kernel, out = dict(zip(rhs_l, b)), dict(zip(out_l, a))
    else:  # operands (input, kernel[, bias ...]) -> output
        kernel, out = dict(zip(rhs_l, b)), dict(zip(out_l, result))
    if not kernel or not out:
        return 0.0
    volume = 1
    for c in rhs_l:
        if c.isdigit():
            volume *= kernel[c]
    voxels = 1
    for c in out_l:
        if c.isdigit():
            voxels *= out[c]
    return 2.0 * out["b"] * voxels * out["f"] * kernel["i"] * volume


def _fused_flops(ins: Instr, comps: dict) -> float:
    """2 x the multiply-adds of the dots inside a fusion (Triton GEMMs: XLA turns 1x1x1
    convolutions into them): result elements x the contracted size."""
    callee = re.search(r"calls=%([\w.\-]+)", ins.attrs)
    if not callee or callee.group(1) not in comps:
        return 0.0
    body = comps[callee.group(1)]
    shapes = {i.name: i.shape for i in body}
    total = 0.0
    for i in body:
        if i.op == "fusion":
            total += _fused_flops(i, comps)
        if i.op != "dot" or not i.operands:
            continue
        lhs = _dims(shapes.get(i.operands[0], ""))
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
        k = 1
        for d in (contract.group(1).split(",") if contract else []):
            if d:
                k *= lhs[int(d)]
        n = 1
        for d in _dims(i.shape):
            n *= d
        total += 2.0 * n * k
    return total


def census(hlo_text: str) -> Census:
    comps, kernels = parse(hlo_text)
    shapes = {ins.name: ins.shape for ins in kernels}
    for m in re.finditer(r"%([\w.\-]+) = (\S+) parameter\(", hlo_text):
        shapes.setdefault(m.group(1), m.group(2))
    count, written = collections.Counter(), collections.Counter()
    per_kernel = []
    coll_bytes = collections.Counter()
    accessed = flops = 0.0
    starts, async_n, coll_n = {}, 0, 0
    compute_seen, windows = 0, []
    for ins in kernels:
        kind = _kind(ins)
        if ins.op.endswith("-done") and ins.operands and ins.operands[0] in starts:
            index, seen = starts.pop(ins.operands[0])
            windows[index] = (windows[index][0], compute_seen - seen)
        if kind is None:
            continue
        count[kind] += 1
        out = ins.out_bytes
        if ins.op.endswith("-start"):  # (operands, results[, context]): the result half
            out = out // 2 if ins.op == "all-reduce-start" else out
        written[kind] += out
        moved = out + sum(shape_bytes(_first_shape(shapes.get(o, ""))) for o in ins.operands)
        accessed += moved
        f = _conv_flops(ins, shapes) if kind.startswith("cuDNN conv") else (
            _fused_flops(ins, comps) if ins.op == "fusion" else 0.0)
        flops += f
        is_coll = ins.op.startswith(("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"))
        if is_coll:
            coll_n += 1
            coll_bytes[kind] += out
            windows.append((out, None))
            if ins.op.endswith("-start"):
                async_n += 1
                starts[ins.name] = (len(windows) - 1, compute_seen)
        else:
            compute_seen += 1
            per_kernel.append((kind, f, moved))
    return Census(dict(count), dict(written), accessed, flops, dict(coll_bytes), async_n, coll_n,
                  compute_seen, windows, per_kernel)


# ---- one compiled function on one GPU topology -------------------------------------------------

@dataclasses.dataclass
class GpuFigures:
    """One compiled function (train step or predict's window step) on one GPU topology, per GPU."""
    card: Gpu
    topology: str
    what: str  # "train" or "predict"
    gpus: int
    hosts: int
    data: int
    spatial: int
    batch: int  # samples (train) or windows (predict) per data-parallel slot
    error: str | None = None
    peak: float = 0.0
    temporaries: float = 0.0
    arguments: float = 0.0
    census: Census | None = None

    @property
    def fits(self) -> bool:
        return self.error is None and self.peak <= self.card.memory_bytes

    @property
    def per_gpu_samples(self) -> float:
        return self.batch / self.spatial

    def compute_s(self) -> float:
        """The kernels at the roofline, one after another: each bound by its FLOPs at the dense
        bf16 peak or its bytes at HBM bandwidth."""
        return self.census.roofline_s(self.card)

    def collective_s(self, link_bytes_per_s: float) -> float:
        """One ring over all n GPUs at one link's bandwidth: each GPU sends and receives 2(n-1)/n
        of the reduced bytes (at InfiniBand: every GPU's whole share through its own NIC, an upper
        bound across nodes)."""
        n = self.data * self.spatial
        if n <= 1:
            return 0.0
        return sum(self.census.collective_bytes.values()) * 2 * (n - 1) / n / link_bytes_per_s

    def hierarchical_s(self) -> float:
        """The all-reduces as NCCL runs them on nodes with one NIC per GPU: a ring within each
        node over NVLink, and each GPU's 1/g share across the h nodes over its own NIC,
        2(g-1)/g x bytes at NVLink + 2(h-1)/h x bytes/g at InfiniBand (g GPUs per node)."""
        n = self.data * self.spatial
        if n <= 1:
            return 0.0
        total = sum(self.census.collective_bytes.values())
        g, h = n // self.hosts, self.hosts
        within = total * 2 * (g - 1) / g / self.card.nvlink_bytes_per_s if g > 1 else 0.0
        across = total / g * 2 * (h - 1) / h / self.card.ib_bytes_per_s if h > 1 else 0.0
        return within + across

    def exposed_collective_s(self) -> float:
        """Collective time (hierarchical_s) the schedule does not hide: each asynchronous
        collective overlaps the kernels XLA scheduled between its start and done (each counted at
        the step's mean kernel time); a synchronous one is all exposed."""
        c = self.census
        total = self.hierarchical_s()
        if not c.collectives or total == 0:
            return 0.0
        per_byte = total / max(sum(b for b, _ in c.windows), 1)
        per_kernel = self.compute_s() / max(c.compute_kernels, 1)
        return sum(max(0.0, b * per_byte - (k or 0) * per_kernel) for b, k in c.windows)

    def estimate_s(self) -> float:
        return self.compute_s() + self.exposed_collective_s()
