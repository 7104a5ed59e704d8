"""Multi-device behaviour on CPU (4 fake devices in a child process) and multi-host TPU meshes
(tests/test_multiprocess.py has the runs of several processes)."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from segguided_jax.training.optim import make_optimizer
from segguided_jax.training.steps import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    return env


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt4"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_checks.py"), ckpt],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), ckpt


def test_spatially_sharded_forward_equals_unsharded(four_devices):
    results, _ = four_devices
    assert results["spatial_forward_shards"] == 4
    assert results["spatial_forward_max_abs_diff"] < 1e-4


def test_spatially_sharded_train_step_agrees_in_loss_gradients_and_parameters(four_devices):
    r = four_devices[0]["spatial_step"]
    ref, sharded = r["one"]["losses"], r["spatial"]["losses"]
    assert np.isfinite(sharded).all() and sharded == pytest.approx(ref, rel=1e-5)
    assert r["grads_max_abs_diff"] < 1e-5 * r["grads_max_abs"]
    # 3 steps moved the parameters by up to param_change; the two runs stay 100x closer than that
    assert r["params_max_abs_diff"] < 1e-2 * r["param_change_max_abs"]


def test_spatially_sharded_step_keeps_activations_split(four_devices):
    """The memory claim: on (data 2, spatial 2) no value of the compiled step holds a whole patch
    depth at full resolution (every one holds its device's half), and the per-device temporaries
    fall well below the data split's alone (1/2 of one device's)."""
    r = four_devices[0]["spatial_step"]
    assert r["one"]["whole_depth_values"] > 0 and r["one"]["half_depth_values"] == 0
    assert r["spatial"]["whole_depth_values"] == 0 and r["spatial"]["half_depth_values"] > 0
    assert r["spatial"]["temp_bytes"] < 0.35 * r["one"]["temp_bytes"]


def test_augment_on_device_step_on_a_spatial_mesh_equals_one_device(four_devices):
    r = four_devices[0]["augment_on_device_step"]
    assert np.isfinite(r["spatial"]).all() and r["spatial"] == pytest.approx(r["one"], rel=1e-5)


def test_windows_over_four_devices_equal_one(four_devices):
    assert four_devices[0]["windows_1_vs_4_max_abs_diff"] < 1e-5


def test_four_device_checkpoint_restores_on_one(four_devices):
    results, ckpt = four_devices
    assert jax.device_count() == 1
    cfg = tiny.get_config()
    init = functools.partial(init_state, 0, cfg.model, make_optimizer(cfg.optim, 10))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), jax.eval_shape(init))
    with ocp.CheckpointManager(ckpt) as mgr:
        restored = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    fresh = jax.jit(init)()
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(sum(np.sum(np.asarray(p)) for p in jax.tree.leaves(restored.params))) == pytest.approx(
        results["param_sum"], rel=1e-6)


LIBTPU = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")  # where launch/env.sh installs it


@pytest.mark.skipif(not os.path.exists(LIBTPU), reason="no libtpu: launch/env.sh installs it on x86-64 Linux only")
def test_spatial_groups_stay_on_one_process_on_multi_host_tpu_slices():
    """On slices of several 4-chip hosts (v5e:2x4, v5e:4x4, v5p:4x4x4 = 64 chips on 16 hosts),
    every spatial group sits on one process, each process feeds as many rows as the others, and the
    physical layout is kept wherever it already did so. Spatial 4 is the case the physical layout
    gets wrong: it spans hosts there, and make_mesh lays each host out on its own instead."""
    import fcntl

    # libtpu serves one process at a time: TPU compiles on one machine queue here instead of failing.
    with open("/tmp/segguided-libtpu.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tpu_mesh_checks.py"), LIBTPU],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        if name.endswith("error"):
            continue
        assert r["each_device_once"] and r["groups_across_processes"] == 0, name
        assert len(r["rows_per_process"]) == 1, name  # every process feeds as many rows
        assert r["kept_physical_layout"] == (r["physical_groups_across_processes"] == 0), name
    assert results["v5p:4x4x4 spatial=4"]["devices"] == 64 and results["v5p:4x4x4 spatial=4"]["processes"] == 16
    assert results["v5p:4x4x4 spatial=4"]["physical_groups_across_processes"] > 0  # the case that needs the fix
    assert results["v5e:4x4 spatial=4"]["physical_groups_across_processes"] > 0
    assert "mesh.spatial=8 must divide the 4 devices of each of the 16 processes" in results["v5p:4x4x4 spatial=8 error"]
