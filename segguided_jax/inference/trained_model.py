"""The trained model: one object, read from a training run's checkpoint or from an exported model
file, holding everything inference needs.

    model = TrainedModel.from_checkpoint("runs/synthetic")          # newest checkpoint (train extra)
    model = TrainedModel.from_checkpoint("runs/synthetic", "best")  # or best/, or one checkpoint folder
    model = TrainedModel.from_file("model.sgm")                     # light install: no flax/orbax/grain
    predictor = model.predictor()                # VolumePredictor with the model's defaults (or overrides)
    post = model.postprocessing()                # the rule learned on the val cases
    model.spacing.voxel_size                     # the voxel size the model was trained at

Both sources give the same object: the window function forward(params, windows) ->
(probabilities, per-stage maps) (segguided_jax.inference.predictor.mirrored_outputs), its parameters, the
resolved training config, the predictor's default settings, the learned post-processing and the
training data's voxel size. The predictor's defaults are derived from the config by
`predictor_defaults`, in this one place: export writes them into a model file's metadata, and a
model file whose stored block disagrees with its stored config is refused.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from segguided_jax import config_schema
from segguided_jax.inference import postprocess
from segguided_jax.io import storage
from segguided_jax.data.brats import MODALITIES
from segguided_jax.data.records import MANIFEST

_OWN = object()  # postprocessing(): the rule learned with the model


@dataclasses.dataclass(frozen=True)
class PredictorSettings:
    """VolumePredictor's keyword arguments: window (3 voxel sizes), overlap in [0, 1), windows per
    batch, mirrored spatial axes (test-time augmentation; () = one pass), decoder stages whose
    attention maps are averaged (coarsest first, -1 = finest; () = none)."""
    window: tuple
    overlap: float
    batch_size: int
    mirror_axes: tuple
    attention_stages: tuple

    def to_json(self) -> dict:
        """The model file's metadata "inference" block."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def predictor_defaults(config) -> PredictorSettings:
    """The settings predict, the sweep's test evaluation and a model file use unless told otherwise:
    the config's eval window, overlap and batch size; the 8 mirrorings (as nnU-Net); the finest
    stage's attention maps when the model has gates. (Validation during training mirrors as
    config.eval.mirror_axes says: training.loop.Validator.)"""
    return PredictorSettings(window=tuple(int(w) for w in config.eval.window), overlap=float(config.eval.overlap),
                             batch_size=int(config.eval.batch_size), mirror_axes=(0, 1, 2),
                             attention_stages=(-1,) if config.model.gates else ())


def postprocessing_rule(config) -> dict:
    """The config's label rule (a model file's metadata "postprocessing" block, less "learned")."""
    return {"threshold": float(config.eval.threshold), "et_rule": config.eval.get("et_rule", "component"),
            "min_et_voxels": int(config.eval.get("min_et_voxels", 0))}


@dataclasses.dataclass(frozen=True)
class TrainingSpacing:
    """What the training data's voxels looked like: the manifest read (None if unreachable), its
    target_spacing (set when the conversion resampled) and the median voxel size of its cases (mm)."""
    manifest: str | None
    target: list | None
    median: list | None

    @property
    def voxel_size(self) -> list | None:
        """The voxel size the model was trained at, if known: the target spacing, else the median."""
        return self.target or self.median


def training_spacing(config) -> TrainingSpacing:
    """The training manifest's spacing (config.data.dir/manifest.json), or all None if unreachable."""
    path = storage.join(str(config.data.get("dir", "")), MANIFEST)
    try:
        manifest = json.loads(storage.read_text(path))
    except (FileNotFoundError, NotADirectoryError):
        return TrainingSpacing(None, None, None)
    target = manifest.get("target_spacing")
    sizes = [c["spacing"] for c in manifest.get("cases", []) if c.get("spacing")]
    median = [float(v) for v in np.median(sizes, axis=0)] if sizes else None
    return TrainingSpacing(path, None if target is None else [float(v) for v in target], median)


def _checkpoint_path(workdir: str, which: str) -> tuple[str, str | None]:
    """(path for checkpoint_reader.load_checkpoint_params, config.json path when that checkpoint holds no
    config) of `which`: last, best or a checkpoint folder."""
    if which == "last":
        return workdir, None
    if which == "best":
        best = storage.join(workdir, "best")
        steps = sorted(int(s) for s in (storage.listdir(best) if storage.isdir(best) else []) if s.isdigit())
        if not steps:
            raise FileNotFoundError(f"{best}: no best checkpoint (the run has not validated yet)")
        # best/ holds the train state only; the run's resolved config is WORKDIR/config.json.
        return storage.join(best, str(steps[-1])), storage.join(workdir, "config.json")
    return which, None


def _check_config(config) -> None:
    """The stored config as far as inference reads it (config_schema; one stored by an older
    version may lack keys, so absent ones are not missed)."""
    config_schema.validate(config, sections=("model", "eval"), partial=True)


@dataclasses.dataclass(frozen=True, eq=False)  # holds parameters: compared by identity
class TrainedModel:
    """A trained network and what predicting with it needs; build it with from_checkpoint or
    from_file.

    source: what was read (workdir, checkpoint folder or model file). config: the resolved training
    config (ml_collections.ConfigDict). forward(params, windows (B, *window, 4) float32) ->
    (probabilities (B, *window, 3) ET/TC/WT, per decoder stage (B, d, h, w, 3) NCR/ED/ET maps,
    coarsest first). params: forward's parameters (an nnx.State from a checkpoint, the list of
    numpy arrays of a model file). defaults: the predictor's default settings. learned: the
    post-processing record learned on the val cases (postprocessing.json), or None. spacing: the
    training data's voxel size. fixed_window: a model file's function takes only its own window.
    checkpoint, step: the checkpoint read (a model file's: the one it was exported from).
    metadata: a model file's metadata.json, else None."""
    source: str
    config: object
    forward: object
    params: object
    defaults: PredictorSettings
    learned: dict | None
    spacing: TrainingSpacing
    fixed_window: bool = False
    checkpoint: str | None = None
    step: int | None = None
    metadata: dict | None = None

    @classmethod
    def from_checkpoint(cls, path: str, checkpoint: str = "last") -> "TrainedModel":
        """From a training workdir or one checkpoint folder (WORKDIR/checkpoints/STEP), local or
        gs://. checkpoint (for a workdir): "last" (its newest), "best" (best/, the highest validation
        dice_mean; the config from WORKDIR/config.json) or a checkpoint folder. Only the parameters
        are read, onto the default device. Needs the `train` extra (flax, orbax)."""
        import ml_collections

        from segguided_jax.inference.checkpoint_reader import load_checkpoint_params
        from segguided_jax.models.network import forward

        read, config_file = _checkpoint_path(path, checkpoint)
        config = ml_collections.ConfigDict(json.loads(storage.read_text(config_file))) if config_file else None
        config, graphdef, params, step = load_checkpoint_params(read, config=config)
        _check_config(config)
        return cls(source=path, config=config, forward=functools.partial(forward, graphdef, output=config.model.output),
                   params=params, defaults=predictor_defaults(config), learned=postprocess.load_learned(path),
                   spacing=training_spacing(config), checkpoint=read, step=step)

    @classmethod
    def in_training(cls, config, graphdef, params, source: str) -> "TrainedModel":
        """The network being trained, with the parameters it has now (training's validation; its
        predictor's set_params takes each validation's); no post-processing learned yet."""
        from segguided_jax.models.network import forward

        return cls(source=source, config=config, forward=functools.partial(forward, graphdef, output=config.model.output),
                   params=params, defaults=predictor_defaults(config), learned=None, spacing=training_spacing(config))

    @classmethod
    def from_file(cls, path: str) -> "TrainedModel":
        """From a model file written by segguided_jax.export (local or gs://), checked as
        model_artefact.load checks it, and its stored predictor and label settings against the ones
        its stored config gives; raises model_artefact.ModelFileError. Imports nothing of the
        training stack."""
        import ml_collections

        from segguided_jax.inference import model_artefact

        model = model_artefact.load(path)
        meta = model.metadata
        config = ml_collections.ConfigDict(meta["config"])
        _check_config(config)
        defaults = predictor_defaults(config)
        stored = {"inference": meta["inference"],
                  "postprocessing": {k: meta["postprocessing"][k] for k in postprocessing_rule(config)}}
        derived = {"inference": defaults.to_json(), "postprocessing": postprocessing_rule(config)}
        for block in derived:
            if stored[block] != derived[block]:
                raise model_artefact.ModelFileError(
                    f"{path}: the metadata's {block} settings {stored[block]} differ from the ones its config gives "
                    f"{derived[block]}")
        if list(meta["input"]["modalities"]) != list(MODALITIES):
            raise model_artefact.ModelFileError(f"{path}: the model takes the modalities {meta['input']['modalities']}"
                                                f", this segguided_jax reads cases as {list(MODALITIES)}")
        return cls(source=path, config=config, forward=model.forward, params=model.params, defaults=defaults,
                   learned=meta["postprocessing"]["learned"], spacing=TrainingSpacing(**meta["spacing"]),
                   fixed_window=True, checkpoint=meta["source"]["checkpoint"], step=meta["source"]["step"],
                   metadata=meta)

    @property
    def gates(self) -> bool:
        return bool(self.config.model.gates)

    @property
    def decoder_stages(self) -> int:
        return config_schema.decoder_stages(self.config.model.widths)

    @property
    def spacing_source(self) -> str:
        """Where the training voxel size comes from, for messages."""
        manifest = self.spacing.manifest or storage.join(str(self.config.data.get("dir", "")), MANIFEST)
        return f"{self.source}, from {manifest}" if self.metadata is not None else manifest

    def predictor_settings(self, *, window=None, overlap=None, batch_size=None, mirror_axes=None,
                           attention_stages=None) -> PredictorSettings:
        """The default settings with those given (None: the default) replaced, checked; raises
        ValueError naming the setting. mirror_axes=() is one pass, attention_stages=() no maps."""
        d = self.defaults
        window = d.window if window is None else tuple(int(w) for w in window)
        if self.fixed_window and window != d.window:
            raise ValueError(f"window {list(window)}: the model file {self.source} was exported for windows of "
                             f"{list(d.window)} voxels")
        divisor = config_schema.size_divisor(self.config.model.widths)
        if len(window) != 3 or any(w <= 0 or w % divisor for w in window):
            raise ValueError(f"window {window}: needs three sizes divisible by {divisor} (2 ** decoder stages)")
        overlap = d.overlap if overlap is None else float(overlap)
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap {overlap}: must be in [0, 1)")
        mirror = d.mirror_axes if mirror_axes is None else tuple(sorted(set(mirror_axes)))
        if any(a not in (0, 1, 2) for a in mirror):
            raise ValueError(f"mirror axes {mirror}: spatial axes are 0, 1, 2")
        if attention_stages is None:
            stages = d.attention_stages
        elif attention_stages and not self.gates:
            raise ValueError("attention stages: this model has no attention gates (model.gates=False)")
        else:
            stages = tuple(attention_stages)
        bad = [s for s in stages if not -self.decoder_stages <= s < self.decoder_stages]
        if bad:
            raise ValueError(f"attention stages {bad}: the model has {self.decoder_stages} decoder stages, indices "
                             f"0..{self.decoder_stages - 1} coarsest first, or -1 for the finest")
        return PredictorSettings(window=window, overlap=overlap, batch_size=int(batch_size or d.batch_size),
                                 mirror_axes=mirror, attention_stages=stages)

    def predictor(self, settings: PredictorSettings | None = None, mesh=None):
        """A VolumePredictor of this model with `settings` (default: the model's defaults; see
        predictor_settings) on `mesh` (default: all devices on the data axis)."""
        from segguided_jax.parallel import sharding
        from segguided_jax.inference.predictor import VolumePredictor

        return VolumePredictor(self.forward, self.params, sharding.make_mesh() if mesh is None else mesh,
                               **dataclasses.asdict(settings or self.defaults))

    def postprocessing(self, learned=_OWN, *, threshold=None, et_rule=None,
                       min_et_voxels=None) -> postprocess.PostProcessing:
        """The label rule: the config's threshold and ET rule (each replaced when given) with the
        component sizes of `learned` (a postprocessing.json record; default: the one learned with
        this model; None: no components removed)."""
        learned = self.learned if learned is _OWN else learned
        eval_cfg = self.config.eval.copy_and_resolve_references()
        with eval_cfg.unlocked():
            for key, value in (("threshold", threshold), ("et_rule", et_rule), ("min_et_voxels", min_et_voxels)):
                if value is not None:
                    eval_cfg[key] = value
        return postprocess.PostProcessing.from_config(eval_cfg, learned and learned["min_volume_mm3"])
