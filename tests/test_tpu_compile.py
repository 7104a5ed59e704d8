"""The TPU path compiles: the tiny config's train step, compiled by the real TPU compiler (libtpu,
no TPU needed) for a v5e:2x2 slice through `python -m segguided_jax.compile_check --topology`.
Its widths are doubled to (8, 16, 32) so that the TPU formulation folds W into the channels in
every stage (by 16, 8 and 4 at 16³, 8³ and 4³), as brats21's stages fold at 128³: the folded
program, not only the plain one, goes through libtpu."""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from segguided_jax.compile_check import libtpu_unavailable
from segguided_jax.models.formulations import fold_factor
from segguided_jax.optim import make_optimizer
from segguided_jax.steps import init_state, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNAVAILABLE = libtpu_unavailable()
BATCH_PER_CHIP = 2
WIDTHS = (8, 16, 32)
LOCK_TIMEOUT_S = 1200  # another process's TPU compile (a brats21 one takes minutes) is waited for


def _tpu_bytes(aval) -> int:
    # A TPU tile is 8 x 128 (minor two dims) of 32-bit words: a value takes at least that padding.
    shape = list(aval.shape) or [1]
    shape[-1] = -(-shape[-1] // 128) * 128
    if len(shape) > 1:
        shape[-2] = -(-shape[-2] // 8) * 8
    return math.prod(shape) * max(aval.dtype.itemsize, 4)


def _values_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(_tpu_bytes(v.aval) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    total += _values_bytes(sub)
    return total


def _memory_bounds(config):
    """(lower, upper) bytes for one chip's peak HBM in the compiled step. Upper: every value the
    step computes (each equation's outputs, sub-programs included) and its arguments alive at
    once, each padded to whole 8 x 128 tiles of 32-bit words: a compiler that frees or fuses
    anything stays below it. Lower: the arguments themselves, unpadded (state and batch are
    inputs, so they are in HBM when the step starts)."""
    tx = make_optimizer(config.optim, config.train.steps)
    state = jax.eval_shape(functools.partial(init_state, config.seed, config.model, tx))
    shape = (BATCH_PER_CHIP,) + tuple(config.data.patch)
    batch = {"image": jax.ShapeDtypeStruct(shape + (config.model.in_channels,), jnp.float32),
             "label": jax.ShapeDtypeStruct(shape, jnp.uint8)}
    closed = jax.make_jaxpr(functools.partial(train_step, loss_cfg=config.loss, output=config.model.output))(
        state, batch)
    args = closed.jaxpr.invars
    lower = sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in args)
    return lower, sum(_tpu_bytes(v.aval) for v in args) + _values_bytes(closed.jaxpr)


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"TPU compiles cannot run here: {UNAVAILABLE}")
def test_tiny_train_step_compiles_for_four_v5e_chips_within_derived_memory():
    assert [fold_factor(w, 16 >> i) for i, w in enumerate(WIDTHS)] == [16, 8, 4]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # CPU flags are not libtpu's
    out = subprocess.run([sys.executable, "-m", "segguided_jax.compile_check", "--config=configs/tiny.py",
                          "--topology=v5e:2x2", f"--batch_per_chip={BATCH_PER_CHIP}", "--no_predict",
                          f"--config.model.widths={WIDTHS}",
                          f"--lock_timeout={LOCK_TIMEOUT_S}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=LOCK_TIMEOUT_S + 900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| v5e:2x2 |")]
    assert len(rows) == 1, out.stdout
    cells = [c.strip() for c in rows[0]]
    assert cells[1] == "4 (1)" and cells[2] == "4×1" and cells[3] == "train", cells  # 4 chips on 1 host
    assert cells[6] == "yes", cells
    peak = float(cells[5].split()[0]) * 2**30
    config = tiny.get_config()
    config.model.widths = WIDTHS
    lower, upper = _memory_bounds(config)
    assert lower <= peak <= upper, (lower, peak, upper)
    assert "all-reduce" in cells[9], cells  # the 4 data-parallel chips sum their gradients


_LOCK_USER = ("import sys; from segguided_jax.compile_check import libtpu_lock\n"
              "with libtpu_lock(float(sys.argv[2]), sys.argv[1]): print('locked')")


def test_libtpu_lock_waits_a_bounded_time_then_names_the_holder(tmp_path):
    import fcntl
    import time
    lock = tmp_path / "libtpu.lock"
    holder = subprocess.Popen(["flock", str(lock), "sleep", "60"])  # another process's compile
    try:
        with open(lock, "a") as probe:  # wait until the holder has it
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(probe, fcntl.LOCK_UN)
                    time.sleep(0.1)
                except BlockingIOError:
                    break
        out = subprocess.run([sys.executable, "-c", _LOCK_USER, str(lock), "1"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode != 0 and "locked" not in out.stdout
    assert f"held by process(es) [{holder.pid}] for more than 1 s" in out.stderr, out.stderr[-2000:]


def test_libtpu_lock_held_by_a_parent_flock_counts_as_ours(tmp_path):
    # `flock LOCK CMD`, the way commands share libtpu, must not deadlock CMD's own wait for it.
    lock = tmp_path / "libtpu.lock"
    out = subprocess.run(["flock", str(lock), sys.executable, "-c", _LOCK_USER, str(lock), "60"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "locked" in out.stdout, out.stderr[-2000:]
