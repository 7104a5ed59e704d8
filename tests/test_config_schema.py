"""The config schema (segguided_jax/config_schema.py): every shipped config validates, values that
cannot work are refused naming the key and what would work (through the real training command
too), the derived values are right, the augmentation plan is built from the config, and importing
the package leaves JAX's configuration as it was."""
from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base, brats21, synthetic, tiny
from segguided_jax import config_schema
from segguided_jax.config_schema import SCHEMA, ConfigError, validate
from segguided_jax.data.augment import initial_patch_size
from segguided_jax.data.augment_plan import AugmentPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(config, *needles):
    with pytest.raises(ConfigError) as e:
        validate(config)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    return str(e.value)


def _set(config, key, value):
    """config (a ConfigDict or a dict) as a dict with key set to value, whatever its type (a config
    file may set any)."""
    config = config if isinstance(config, dict) else config.to_dict()
    node = config
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_shipped_config_validates(path):
    name = os.path.splitext(os.path.basename(path))[0]
    if name == "__init__":
        return
    validate(importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize("module, divisor, stages", [(synthetic, 8, 3), (tiny, 4, 2), (brats21, 16, 4)])
def test_derived_values(module, divisor, stages):
    """widths (8, 16, 32, 64): 3 downsamplings, sizes divisible by 8; tiny (4, 8, 16): 2, 4;
    brats21 (32 ... 320): 4, 16."""
    assert validate(module.get_config()) == config_schema.Derived(size_divisor=divisor, decoder_stages=stages)


def test_base_is_what_every_config_extends():
    """The demo is the base as it is; the schema names exactly the base's keys."""
    assert synthetic.get_config().to_dict() == base.get_config().to_dict()
    assert set(dict(config_schema._flatten(base.get_config()))) == set(SCHEMA)


def test_patch_not_divisible_names_the_key_the_rule_and_a_size_that_works():
    config = _set(synthetic.get_config(), "data.patch", (32, 32, 30))
    _refused(config, "data.patch=(32, 32, 30): every size must be divisible by 8 "
                     "(2**(len(model.widths)-1) for model.widths=(8, 16, 32, 64)); e.g. (32, 32, 32)")
    _refused(_set(tiny.get_config(), "eval.window", (16, 18, 16)), "eval.window=(16, 18, 16)", "e.g. (16, 20, 16)")


def test_bad_patch_is_refused_by_the_training_command_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    t = time.time()
    result = subprocess.run([sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py",
                             "--config.data.patch=(16,16,14)", f"--workdir={workdir}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode != 0
    assert "data.patch=(16, 16, 14): every size must be divisible by 4" in result.stderr, result.stderr
    assert "e.g. (16, 16, 16)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
    assert time.time() - t < 60  # no JAX start-up, data or compilation first


def test_a_mistyped_override_is_refused_by_the_command(tmp_path):
    """ml_collections refuses a key the config lacks (lock_config): the schema need not."""
    result = subprocess.run([sys.executable, "-m", "segguided_jax.train", "--config=configs/tiny.py",
                             "--config.model.widht=3", f"--workdir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode != 0 and "widht" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", [k for k, spec in SCHEMA.items() if spec.choices])
def test_every_closed_set_refuses_other_values(key):
    choices = SCHEMA[key].choices
    message = _refused(_set(tiny.get_config(), key, "nonsense"), f"{key}='nonsense': must be one of")
    assert all(repr(c) in message for c in choices)
    for choice in choices:  # and takes each of its values
        validate(_set(tiny.get_config(), key, choice))


def test_the_closed_sets_are_their_owners():
    from segguided_jax.inference import postprocess
    from segguided_jax.training import losses, steps
    from segguided_jax.models import formulations
    from segguided_jax.models.network import OUTPUT_CHANNELS

    assert set(SCHEMA["model.output"].choices) == set(OUTPUT_CHANNELS)
    assert set(SCHEMA["loss.aux_dice"].choices) == set(losses.AUX_DICE_MODES)
    assert set(SCHEMA["eval.postprocess_rule"].choices) == set(postprocess.CHOICE_RULES)
    assert set(SCHEMA["model.gpu_conv_layout"].choices) == set(steps._GPU_CONV_LAYOUTS)
    assert set(SCHEMA["model.formulation"].choices) == set(formulations.PLATFORMS)


@pytest.mark.parametrize("key, value, needle", [
    ("data.augment.rotation_probability", 1.5, "must be >= 0 and <= 1"),
    ("data.foreground_fraction", -0.1, "must be >= 0 and <= 1"),
    ("eval.threshold", 2.0, "must be >= 0 and <= 1"),
    ("eval.overlap", 1.0, "must be >= 0 and < 1"),
    ("train.batch_size", 0, "must be >= 1"),
    ("train.batch_size", 2.0, "must be an int"),
    ("model.gates", 1, "must be a bool"),
    ("data.patch", (16, 16), "needs 3 entries"),
    ("data.augment.scale_range", (1.4, 0.7), "low <= high"),
    ("data.foreground_classes", ((1,), (4,)), "internal labels 1 (NCR), 2 (ED), 3 (ET)"),
    ("eval.mirror_axes", (0, 3), "every entry must be >= 0 and <= 2"),
    ("optim.learning_rate", 0.0, "must be > 0"),
    ("mesh.data", 0, "mesh.data=0"),
])
def test_values_that_cannot_work_are_refused(key, value, needle):
    _refused(_set(tiny.get_config(), key, value), f"{key}=", needle)


def test_rules_between_keys():
    _refused(_set(tiny.get_config(), "model.encoder_blocks", (1, 1)),
             "model.encoder_blocks=(1, 1): needs 3 entries, one per width of model.widths=(4, 8, 16)")
    _refused(_set(tiny.get_config(), "model.decoder_blocks", (1, 1, 1)),
             "model.decoder_blocks=(1, 1, 1): needs 2 entries, one per decoder stage")
    _refused(_set(tiny.get_config(), "loss.aux_stage_weights", (1.0,)), "loss.aux_stage_weights=(1.0,): needs 2")
    validate(_set(tiny.get_config(), "loss.aux_stage_weights", (1.0, 0.5)))
    _refused(_set(tiny.get_config(), "mesh.spatial", 8), "its first size 16 must be divisible by mesh.spatial=8 "
             "times 4", "e.g. 32")
    _refused(_set(_set(tiny.get_config(), "mesh.data", 4), "train.batch_size", 6), "train.batch_size=6", "e.g. 8")
    _refused(_set(tiny.get_config(), "model.num_maps", 2), "model.num_maps=2", "loss.aux_weight=0")
    validate(_set(_set(tiny.get_config(), "model.num_maps", 2), "loss.aux_weight", 0.0))
    _refused(_set(tiny.get_config(), "lease.stale_secs", 10.0), "lease.stale_secs=10.0: must exceed")


def test_every_problem_is_listed_at_once():
    config = _set(_set(tiny.get_config(), "model.upsample", "bilinear"), "train.batch_size", -1)
    _refused(config, "model.upsample='bilinear'", "train.batch_size=-1")


def test_unknown_and_missing_keys_in_a_config_file():
    config = tiny.get_config()
    with config.unlocked():
        config.model.widht = 3
        del config.eval["threshold"]
    _refused(config, "model.widht: unknown key; known keys here: model.in_channels", "eval.threshold: missing")


def test_a_stored_config_is_checked_as_far_as_it_goes():
    """predict and export read a run's stored config, which an older version may have written with
    fewer keys: partial checks what is there."""
    stored = {"model": {"widths": [4, 8, 16], "output": "regions"}, "eval": {"window": [16, 16, 16]}}
    assert validate(stored, sections=("model", "eval"), partial=True).size_divisor == 4
    stored["eval"]["window"] = [16, 16, 10]
    with pytest.raises(ConfigError, match=r"eval.window=\(16, 16, 10\)"):
        validate(stored, sections=("model", "eval"), partial=True)


def test_augment_plan_from_the_config():
    host = AugmentPlan.from_data(tiny.get_config().data)
    assert host == AugmentPlan(on_device=False, patch=(16, 16, 16), enlarged=(16, 16, 16), crop_dtype="int16")
    assert host.shared_keys == ()
    assert {k: s for k, (s, _) in host.batch_arrays(2, 4).items()} == {"image": (2, 16, 16, 16, 4),
                                                                      "label": (2, 16, 16, 16)}
    data = tiny.get_config().data
    data.augment_on_device, data.augment.rotation_probability = True, 0.2
    device = AugmentPlan.from_data(data)
    enlarged = initial_patch_size((16, 16, 16), data.augment)
    assert device.on_device and device.enlarged == enlarged and enlarged != (16, 16, 16)
    assert device.slot == int(np.prod(enlarged)) and device.shared_keys == ("image", "label")
    arrays = device.batch_arrays(2, 4)
    assert arrays["image"] == ((2, device.slot, 4), np.dtype("int16")) and arrays["box"][0] == (2, 7)


def test_importing_the_package_leaves_jax_config_as_it_was():
    """Every module of the package and every config, imported in a fresh process: jax.config's
    values are those before (the threefry setting is scoped to where draws are made)."""
    code = """
import importlib, pkgutil, sys, glob, os
import jax
before = dict(jax.config.values)
import segguided_jax
names = [m.name for m in pkgutil.walk_packages(segguided_jax.__path__, "segguided_jax.")]
names += ["configs." + os.path.basename(p)[:-3] for p in glob.glob("configs/*.py")]
for name in names:
    importlib.import_module(name)
after = dict(jax.config.values)
changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
print(len(names), "modules;", "changed:", changed)
sys.exit(1 if changed else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stdout + result.stderr


def test_parameters_do_not_depend_on_the_callers_threefry_setting():
    """build_model draws under the package's own setting, so a caller's (or an earlier import's)
    does not change the parameters."""
    def params(partitionable):
        with jax.threefry_partitionable(partitionable):
            return jax.tree.leaves(nnx.state(build(tiny.get_config().model, nnx.Rngs(0))))

    from segguided_jax.models.network import build_model as build

    for a, b in zip(params(True), params(False), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
