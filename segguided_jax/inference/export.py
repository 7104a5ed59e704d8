"""Export a trained model as one deployable file (see segguided_jax.inference.model_artefact for its layout).

    python -m segguided_jax.export --workdir RUN [--checkpoint last|best|PATH] --out MODEL.sgm
        [--platforms cpu cuda tpu]

--checkpoint: `last` (default) the newest checkpoint in RUN/checkpoints, `best` the state in
RUN/best (the highest validation dice_mean), or a checkpoint folder RUN/checkpoints/STEP. The
window function (the network, its head's probabilities and every decoder stage's attention maps
for a batch of windows) is exported with jax.export for every platform in --platforms at once, the
window batch a symbolic dimension; the spatial window is the config's eval.window. Beside it go
the parameters and what predict needs: the training voxel size (from the training manifest, which
must be reachable), the post-processing learned on the val cases (RUN/postprocessing.json), the
config's inference and label settings, the data fingerprint and the versions.

`python -m segguided_jax.predict --model MODEL.sgm ...` then predicts with jax, numpy, scipy,
nibabel and matplotlib only.
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import PackageNotFoundError, version

PLATFORMS = ("cpu", "cuda", "tpu")
NORMALISATION = ("crop to the brain's non-zero box (all modalities), optionally resample to the training "
                 "voxel size, then z-score each modality over its non-zero voxels; segguided_jax.data.preprocess")


def _data_fingerprint(config) -> str | None:
    from segguided_jax.data.records import load_manifest

    try:
        return load_manifest(config.data.dir).get("fingerprint")
    except FileNotFoundError:
        return None


def export_model(workdir: str, out: str, checkpoint: str = "last", platforms=PLATFORMS, log=print) -> dict:
    """Writes the model file `out` from a training run; returns its metadata."""
    import dataclasses

    import jax
    import numpy as np

    from segguided_jax.inference import model_artefact
    from segguided_jax.io import storage
    from segguided_jax.data.brats import EDITIONS, MODALITIES, REGIONS, SUBREGIONS
    from segguided_jax.models import formulations
    from segguided_jax.inference.trained_model import TrainedModel, postprocessing_rule

    t0 = time.time()
    model = TrainedModel.from_checkpoint(workdir, checkpoint)
    config = model.config
    if model.spacing.manifest is None:
        raise FileNotFoundError(f"{model.spacing_source}: the training manifest is not reachable, so the training "
                                "voxel size is unknown; export where config.data.dir is readable")
    leaves, treedef = jax.tree.flatten(model.params)
    leaves = [np.asarray(a) for a in leaves]
    window = list(model.defaults.window)

    def window_fn(leaves, x):
        return model.forward(jax.tree.unflatten(treedef, leaves), x)

    (batch,) = jax.export.symbolic_shape("b")
    specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves],
             jax.ShapeDtypeStruct((batch, *window, int(config.model.in_channels)), np.float32))
    with formulations.lowering_for(*platforms):  # each platform's formulations are traced
        exported = jax.export.export(jax.jit(window_fn), platforms=tuple(platforms))(*specs)
    serialized = exported.serialize()
    try:
        package = version("segguided_jax")
    except PackageNotFoundError:
        package = "unknown"
    stages = len(exported.out_avals) - 1
    metadata = {
        "format": model_artefact.FORMAT_NAME,
        "format_version": model_artefact.FORMAT_VERSION,
        "package_version": package,
        "jax_version": jax.__version__,
        "jax_calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "source": {"workdir": storage.abspath(workdir), "checkpoint": storage.abspath(model.checkpoint),
                   "step": model.step},
        "data_fingerprint": _data_fingerprint(config),
        "input": {"modalities": list(MODALITIES), "normalisation": NORMALISATION},
        "spacing": dataclasses.asdict(model.spacing),
        "output": {"head": config.model.output, "probabilities": list(REGIONS), "attention_maps": list(SUBREGIONS),
                   "attention_stages": stages},
        "labels": {name: dict(zip(("bg", "NCR", "ED", "ET"), e.labels)) for name, e in EDITIONS.items()},
        # Both derived from the config (segguided_jax.inference.trained_model), which a reader checks.
        "postprocessing": {**postprocessing_rule(config), "learned": model.learned},
        "inference": model.defaults.to_json(),
        "params": {"sha256": model_artefact.params_sha256(leaves), "count": int(sum(a.size for a in leaves)),
                   "shapes": [list(a.shape) for a in leaves], "dtypes": [a.dtype.name for a in leaves]},
        "config": config.to_dict(),
    }
    model_artefact.write(out, serialized, leaves, metadata)
    log(f"export: {model.checkpoint} (step {model.step}) -> {out}: {', '.join(exported.platforms)}, window {window}, "
        f"{metadata['params']['count']:,} parameters, {len(storage.read_bytes(out)) / 2**20:.1f} MiB, "
        f"{time.time() - t0:.1f} s", flush=True)
    return metadata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m segguided_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir (local or gs://)")
    p.add_argument("--checkpoint", default="last", help="last (default), best, or a checkpoint folder")
    p.add_argument("--out", required=True, help="the model file to write (local or gs://), e.g. model.sgm")
    p.add_argument("--platforms", nargs="+", default=list(PLATFORMS), choices=PLATFORMS,
                   help="platforms to lower for (default: all three)")
    args = p.parse_args(argv)
    try:
        export_model(args.workdir, args.out, args.checkpoint, args.platforms)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

