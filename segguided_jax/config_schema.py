"""The config's schema: every key of a run's config, its type and the values that can work, and
the values derived from it, computed here once.

Configs stay ml_collections ConfigDicts (users override keys with --config.key=value); every
config under configs/ extends configs/base.py. `validate(config)` checks one against SCHEMA before
anything runs (the entry points call it first: train, compile_check, predict, export, the
benchmarks that build a step) and returns its `Derived` values; a value that cannot work stops
the run there with a ConfigError naming each key, the value and what would work, instead of
failing after set-up deep inside JAX.

This module imports no JAX, so that the training command refuses a config within a second. The
closed sets below are the ones their owners accept (models.network.OUTPUT_CHANNELS,
losses.AUX_DICE_MODES, postprocess.CHOICE_RULES, steps' GPU convolution layouts);
tests/test_config_schema.py holds them together.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping


class ConfigError(ValueError):
    """A config that cannot work: one line per problem, each naming the key and what would work."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One key's type and the values that can work.
    kind: "int", "float" (an int is accepted), "bool", "str", "ints" or "floats" (a tuple of
      them), "range" (a (lo, hi) pair of floats with lo <= hi), "label_sets" (a tuple of
      non-empty tuples of internal labels 1..3);
    choices: the closed set of allowed values, where there is one;
    ge, gt, le, lt: bounds (of each element, for tuples);
    length / min_length: of a tuple; none: None is allowed too."""
    kind: str
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None
    min_length: int | None = None
    none: bool = False


def _int(**bounds) -> Key:
    return Key("int", **bounds)


def _float(**bounds) -> Key:
    return Key("float", **bounds)


def _choice(*values) -> Key:
    return Key("str", choices=values)


PROBABILITY = Key("float", ge=0.0, le=1.0)
BOOL = Key("bool")
STR = Key("str")

# Every key of a run's config (configs/base.py gives each its value and says what it does).
SCHEMA: dict[str, Key] = {
    "seed": _int(),
    "data.dir": STR,
    "data.split": STR,  # checked against the data's splits.json when it is read
    "data.allow_fingerprint_mismatch": BOOL,
    "data.patch": Key("ints", length=3, ge=1),
    "data.foreground_fraction": PROBABILITY,
    "data.patch_overhang": _float(ge=0.0, le=0.5),
    "data.foreground_classes": Key("label_sets", min_length=1),
    "data.patches_per_case": _int(ge=1),
    "data.augment.rotation_probability": PROBABILITY,
    "data.augment.rotation_max_degrees": _float(ge=0.0, le=180.0),
    "data.augment.scale_probability": PROBABILITY,
    "data.augment.scale_range": Key("range", gt=0.0),
    "data.augment.mirror_probability": PROBABILITY,
    "data.augment.gamma_probability": PROBABILITY,
    "data.augment.gamma_invert_probability": PROBABILITY,
    "data.augment.gamma_range": Key("range", gt=0.0),
    "data.augment.gamma_retain_stats": BOOL,
    "data.augment.brightness_probability": PROBABILITY,
    "data.augment.brightness_range": Key("range", ge=0.0),
    "data.augment.contrast_probability": PROBABILITY,
    "data.augment.contrast_range": Key("range", ge=0.0),
    "data.augment.noise_probability": PROBABILITY,
    "data.augment.noise_std": _float(ge=0.0),
    "data.augment.blur_probability": PROBABILITY,
    "data.augment.blur_per_channel_probability": PROBABILITY,
    "data.augment.blur_sigma_range": Key("range", gt=0.0),
    "data.augment.lowres_probability": PROBABILITY,
    "data.augment.lowres_per_channel_probability": PROBABILITY,
    "data.augment.lowres_zoom_range": Key("range", gt=0.0, le=1.0),
    "data.augment.bias_field_probability": PROBABILITY,
    "data.augment.bias_field_coeff_range": Key("range"),
    "data.augment_on_device": BOOL,
    "data.device_crop_dtype": _choice("int16", "float32"),
    "data.num_workers": _int(ge=0),
    "data.read_threads": _int(ge=1),
    "data.prefetch": _int(ge=0),
    "model.in_channels": _int(ge=1),
    "model.widths": Key("ints", min_length=2, ge=1),
    "model.encoder_blocks": Key("ints", ge=0),
    "model.decoder_blocks": Key("ints", ge=1),
    "model.down_kernel": _int(ge=1),
    "model.upsample": _choice("transpose", "resize"),
    "model.gates": BOOL,
    "model.num_maps": _int(ge=1),
    "model.gate_stop_gradient": BOOL,
    "model.gate_logit_scale": _float(gt=0.0),
    "model.output": _choice("regions", "labels"),
    "model.leaky_slope": _float(ge=0.0),
    "model.compute_dtype": _choice("float32", "bfloat16", "float16"),
    "model.gpu_conv_layout": _choice("default", "channels_last"),
    "model.formulation": _choice("auto", "tpu"),
    "model.cpu_rewrites": BOOL,
    "model.tpu_fold": BOOL,
    "model.tpu_remat_min_voxels": _int(ge=0, none=True),
    "loss.aux_weight": _float(ge=0.0),
    "loss.aux_stage_weights": Key("floats", ge=0.0, none=True),
    "loss.aux_dice": _choice("batch", "sample", "present"),
    "loss.batch_dice": BOOL,
    "loss.dice_smooth": _float(ge=0.0),
    "optim.learning_rate": _float(gt=0.0),
    "optim.weight_decay": _float(ge=0.0),
    "optim.b1": _float(ge=0.0, lt=1.0),
    "optim.b2": _float(ge=0.0, lt=1.0),
    "optim.grad_clip_norm": _float(gt=0.0),
    "optim.warmup_steps": _int(ge=0),
    "optim.sgdr_first_cycle_steps": _int(ge=0),
    "optim.sgdr_cycle_mult": _float(gt=0.0),
    "optim.min_lr_ratio": PROBABILITY,
    "optim.decay": _choice("kernels", "all"),
    "train.batch_size": _int(ge=1),
    "train.steps": _int(ge=1),
    "train.log_every": _int(ge=1),
    "train.eval_every": _int(ge=1),
    "train.stall_timeout_s": _float(ge=0.0),
    "train.preempt_grace_s": _float(ge=0.0),
    "mesh.data": _int(ge=-1),
    "mesh.spatial": _int(ge=1),
    "checkpoint.every_steps": _int(ge=1),
    "checkpoint.keep": _int(ge=1),
    "checkpoint.async_save": BOOL,
    "checkpoint.allow_config_change": BOOL,
    "storage.retry_secs": _float(ge=0.0),
    "lease.renew_secs": _float(gt=0.0),
    "lease.stale_secs": _float(gt=0.0),
    "eval.window": Key("ints", length=3, ge=1),
    "eval.overlap": _float(ge=0.0, lt=1.0),
    "eval.batch_size": _int(ge=1),
    "eval.threshold": PROBABILITY,
    "eval.mirror_axes": Key("ints", ge=0, le=2),
    "eval.et_rule": _choice("component", "case"),
    "eval.min_et_voxels": _int(ge=0),
    "eval.max_cases": _int(ge=0),
    "eval.postprocess_candidates_mm3": Key("floats", min_length=1, ge=0.0),
    "eval.postprocess_rule": _choice("plateau_middle", "smallest", "largest"),
    "eval.postprocess_floor_mm3": _float(ge=0.0),
}

SUBREGION_MAPS = 3  # the auxiliary loss supervises one map per sub-region: NCR, ED, ET


def decoder_stages(widths) -> int:
    """The network's stride-2 downsamplings, one per width after the first, and as many decoder
    stages (each with its attention maps when model.gates)."""
    return len(widths) - 1


def size_divisor(widths) -> int:
    """What every spatial size the network sees (patch, window) must be divisible by: 2 ** its
    downsamplings."""
    return 2 ** decoder_stages(widths)


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values that follow from a config, computed once by `validate`.
    size_divisor: 2 ** (len(model.widths) - 1), what every patch and window size must be divisible by;
    decoder_stages: len(model.widths) - 1, the decoder stages (and, with gates, attention maps)."""
    size_divisor: int
    decoder_stages: int


def validate(config, *, sections: tuple[str, ...] | None = None, partial: bool = False) -> Derived:
    """Checks `config` (a ConfigDict or a mapping, e.g. a run's config.json) against SCHEMA and
    the rules between keys; returns its Derived values, or raises ConfigError listing every problem.
    sections: only the keys under these prefixes (e.g. ("model", "eval") for a stored model);
    partial: keys missing from the config, or unknown to the schema, are passed over (a config
    stored by an older version)."""
    flat = dict(_flatten(config))
    schema = {k: v for k, v in SCHEMA.items() if sections is None or k.split(".")[0] in sections}
    problems = []
    if not partial:
        problems += [f"{key}: missing; every config extends configs/base.py, which sets it"
                     for key in schema if key not in flat]
        for key in flat:
            if key not in SCHEMA and (sections is None or key.split(".")[0] in sections):
                problems.append(f"{key}: unknown key; {_near(key)}")
    ok = {}
    for key, spec in schema.items():
        if key in flat:
            problem = _check(flat[key], spec)
            if problem:
                problems.append(f"{key}={_show(flat[key])}: {problem}")
            else:
                ok[key] = flat[key]
    problems += _between(ok)
    if problems:
        raise ConfigError("the config cannot work:\n  " + "\n  ".join(problems))
    widths = ok.get("model.widths", flat.get("model.widths", (0, 0)))
    return Derived(size_divisor=size_divisor(widths), decoder_stages=decoder_stages(widths))


def _between(v: dict) -> list[str]:
    """The rules between keys, among the keys whose own values passed."""
    problems = []
    widths = v.get("model.widths")
    if widths is not None:
        widths = tuple(widths)
        stages, divisor = decoder_stages(widths), size_divisor(widths)
        why = f"2**(len(model.widths)-1) for model.widths={widths}"
        for key, want in (("model.encoder_blocks", len(widths)), ("model.decoder_blocks", stages)):
            if key in v and len(v[key]) != want:
                problems.append(f"{key}={_show(v[key])}: needs {want} entries, one per "
                                f"{'width' if want == len(widths) else 'decoder stage'} of model.widths={widths}")
        for key in ("data.patch", "eval.window"):
            if key in v and any(int(s) % divisor for s in v[key]):
                problems.append(f"{key}={_show(v[key])}: every size must be divisible by {divisor} ({why}); "
                                f"e.g. {_round_up(v[key], divisor)}")
        patch, spatial = v.get("data.patch"), v.get("mesh.spatial", 1)
        if (patch is not None and spatial > 1 and not any(int(s) % divisor for s in patch)
                and int(patch[0]) % (spatial * divisor)):
            first = int(patch[0])
            problems.append(f"data.patch={_show(v['data.patch'])}: its first size {first} must be divisible by "
                            f"mesh.spatial={spatial} times {divisor} ({why}), so every device holds whole coarse "
                            f"voxels; e.g. {-(-first // (spatial * divisor)) * spatial * divisor}")
        weights = v.get("loss.aux_stage_weights")
        if weights is not None and len(weights) != stages:
            problems.append(f"loss.aux_stage_weights={_show(weights)}: needs {stages} entries, one per decoder "
                            f"stage of model.widths={widths}, or None (halving per stage)")
    if v.get("model.gates") and v.get("loss.aux_weight", 0) > 0 and v.get("model.num_maps", SUBREGION_MAPS) != SUBREGION_MAPS:
        problems.append(f"model.num_maps={v['model.num_maps']}: the auxiliary loss (loss.aux_weight="
                        f"{v['loss.aux_weight']}) supervises {SUBREGION_MAPS} maps (NCR, ED, ET); set "
                        f"{SUBREGION_MAPS}, or loss.aux_weight=0")
    if v.get("mesh.data") == 0:
        problems.append("mesh.data=0: -1 (every device the spatial axis leaves) or a positive device count")
    data = v.get("mesh.data", -1)
    if data > 0 and "train.batch_size" in v and v["train.batch_size"] % data:
        problems.append(f"train.batch_size={v['train.batch_size']}: must be divisible by mesh.data={data}; "
                        f"e.g. {-(-v['train.batch_size'] // data) * data}")
    if "lease.renew_secs" in v and "lease.stale_secs" in v and v["lease.stale_secs"] <= v["lease.renew_secs"]:
        problems.append(f"lease.stale_secs={v['lease.stale_secs']}: must exceed lease.renew_secs="
                        f"{v['lease.renew_secs']}, or a live run's lease is taken over between renewals")
    return problems


def _check(value, spec: Key) -> str | None:
    """What is wrong with one value against its Key, or None."""
    if value is None:
        return None if spec.none else "must be set (None does not work here)"
    kind = spec.kind
    if kind in ("int", "float", "bool", "str"):
        if not _is(value, kind):
            return f"must be {'an' if kind == 'int' else 'a'} {kind}"
        if spec.choices and value not in spec.choices:
            return f"must be one of {', '.join(repr(c) for c in spec.choices)}"
        return _bounds(value, spec) if kind in ("int", "float") else None
    if not isinstance(value, (tuple, list)):
        return "must be a tuple"
    if spec.length is not None and len(value) != spec.length:
        return f"needs {spec.length} entries"
    if spec.min_length is not None and len(value) < spec.min_length:
        return f"needs at least {spec.min_length} entries"
    if kind == "label_sets":
        if not all(isinstance(s, (tuple, list)) and s and all(_is(x, "int") and 1 <= x <= 3 for x in s)
                   for s in value):
            return "must be non-empty tuples of internal labels 1 (NCR), 2 (ED), 3 (ET), e.g. ((1,), (2,), (3,))"
        return None
    element = "int" if kind == "ints" else "float"
    if not all(_is(x, element) for x in value):
        return f"every entry must be {'an' if element == 'int' else 'a'} {element}"
    if kind == "range":
        if len(value) != 2 or value[0] > value[1]:
            return "must be a (low, high) pair with low <= high"
    for x in value:
        problem = _bounds(x, spec)
        if problem:
            return "every entry " + problem
    if kind == "ints" and spec.le == 2 and len(set(value)) != len(value):  # axes
        return "every axis at most once"
    return None


def _is(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str)


def _bounds(x, spec: Key) -> str | None:
    parts = []
    if spec.ge is not None:
        parts.append(f">= {spec.ge:g}")
    if spec.gt is not None:
        parts.append(f"> {spec.gt:g}")
    if spec.le is not None:
        parts.append(f"<= {spec.le:g}")
    if spec.lt is not None:
        parts.append(f"< {spec.lt:g}")
    if ((spec.ge is not None and x < spec.ge) or (spec.gt is not None and x <= spec.gt)
            or (spec.le is not None and x > spec.le) or (spec.lt is not None and x >= spec.lt)):
        return "must be " + " and ".join(parts)
    return None


def _flatten(config, prefix: str = ""):
    """(dotted key, value) of every leaf of a ConfigDict or mapping."""
    items = config.items() if hasattr(config, "items") else ()
    for key, value in items:
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _near(key: str) -> str:
    """A hint for an unknown key: the known keys of its section."""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    known = [k for k in SCHEMA if k.startswith(section) and "." not in k[len(section):]]
    return f"known keys here: {', '.join(known)}" if known else f"known sections: {sorted({k.split('.')[0] for k in SCHEMA})}"


def _show(value) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _round_up(sizes, divisor: int) -> tuple[int, ...]:
    return tuple(max(divisor, -(-int(s) // divisor) * divisor) for s in sizes)
