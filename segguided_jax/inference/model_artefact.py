"""The deployable model: one file holding the exported network, its parameters and everything
predict needs, readable without the training stack (no flax, optax, orbax or grain).

A model file is a zip archive (stored, not compressed: float parameters barely compress) with
  metadata.json     what predict needs beside the function (see `segguided_jax.export`): format
                    version, training voxel size, modality order, normalisation, label values per
                    edition, thresholds, learned post-processing, window / overlap / mirroring
                    defaults, parameter sha256 and layout, data fingerprint, resolved config,
                    package and jax versions
  forward.jax       `jax.export.Exported.serialize()` of forward(params, windows) ->
                    (probabilities, maps), lowered for cpu, cuda and tpu with the window batch a
                    symbolic dimension: probabilities (b, *window, 3) ET/TC/WT, maps one
                    (b, d, h, w, 3) NCR/ED/ET array per decoder stage, coarsest first
  params/NNNN.npy   the parameters, the function's first argument (a list), in order

`load` checks the file before anything is predicted: a damaged or truncated archive, a format newer
than this code reads, a function not lowered for the running platform, or metadata that disagrees
with the function or the parameters is a `ModelFileError` naming the file and the fault.
segguided_jax.inference.trained_model reads a model file into the object predict uses, and checks there that
the metadata's inference and label settings are the ones its stored config gives.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile

import numpy as np

from segguided_jax.io import storage

# Our own serialisation version: bump it when the archive's layout or the metadata's meaning
# changes in a way an older reader would misread. jax.export versions the function itself.
FORMAT_VERSION = 1
FORMAT_NAME = "segguided_jax model"
SUFFIX = ".sgm"
_METADATA, _FUNCTION, _PARAMS = "metadata.json", "forward.jax", "params/"


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and what is wrong."""


def params_sha256(leaves) -> str:
    """sha256 over the parameters' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for a in leaves:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write(path: str, serialized: bytes, leaves, metadata: dict) -> None:
    """Writes the archive whole or not at all (storage.write_bytes: temporary name, then rename)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(_METADATA, json.dumps(metadata, indent=1))
        z.writestr(_FUNCTION, serialized)
        for i, leaf in enumerate(leaves):
            npy = io.BytesIO()
            np.save(npy, np.asarray(leaf), allow_pickle=False)
            z.writestr(f"{_PARAMS}{i:04d}.npy", npy.getvalue())
    storage.write_bytes(path, buf.getvalue())


@dataclasses.dataclass
class ModelFile:
    path: str
    metadata: dict
    exported: object  # jax.export.Exported
    params: list  # numpy arrays, the function's first argument

    def forward(self, params, x):
        """The exported window function: (probabilities, per-stage maps); see the module docstring."""
        return self.exported.call(params, x)


def _fail(path: str, what: str):
    raise ModelFileError(f"{path}: {what}")


def read_metadata(path: str) -> dict:
    """metadata.json of a model file, checked for format and version only (no jax needed)."""
    return _open(path)[1]


def _open(path: str):
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        _fail(path, "no such model file")
    except IsADirectoryError:
        _fail(path, "a folder, not a model file (segguided_jax.export writes one file)")
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        _fail(path, f"not a readable model file (truncated or damaged: {e})")
    if bad is not None:
        _fail(path, f"damaged model file: member {bad} fails its CRC check")
    try:
        metadata = json.loads(z.read(_METADATA))
    except KeyError:
        _fail(path, f"not a segguided_jax model file (no {_METADATA})")
    except ValueError as e:
        _fail(path, f"{_METADATA} is not valid JSON ({e})")
    if metadata.get("format") != FORMAT_NAME:
        _fail(path, f"not a segguided_jax model file ({_METADATA} names format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        _fail(path, f"model file format version {version} is newer than this segguided_jax reads "
                    f"(up to {FORMAT_VERSION}); it was written by segguided_jax {metadata.get('package_version')}: "
                    "upgrade segguided_jax")
    return z, metadata


def load(path: str) -> ModelFile:
    """Reads and checks a model file (see the module docstring); raises ModelFileError."""
    z, metadata = _open(path)
    exported = _deserialize(path, z)
    names = sorted(n for n in z.namelist() if n.startswith(_PARAMS))
    try:
        params = [np.load(io.BytesIO(z.read(n)), allow_pickle=False) for n in names]
    except ValueError as e:
        _fail(path, f"unreadable parameters ({e})")
    _check(path, metadata, exported, params)
    return ModelFile(path, metadata, exported, params)


def read_function(path: str):
    """The exported function (jax.export.Exported, every platform it was lowered for), without
    checking it against this machine or the metadata."""
    return _deserialize(path, _open(path)[0])


def _deserialize(path: str, z):
    import jax
    from jax import export

    try:
        return export.deserialize(bytearray(z.read(_FUNCTION)))
    except KeyError:
        _fail(path, f"no exported function ({_FUNCTION})")
    except Exception as e:  # noqa: BLE001 - flatbuffer and version errors come as many types
        _fail(path, f"the exported function cannot be read by jax {jax.__version__} ({type(e).__name__}: {e})")


def _check(path: str, metadata: dict, exported, params: list) -> None:
    """Metadata against the function and the parameters, and the function against this machine."""
    from jax import export

    platform = export.default_export_platform()
    if platform not in exported.platforms:
        _fail(path, f"exported for {', '.join(exported.platforms)}, not for this machine's platform {platform}; "
                    "export it again with that platform")
    if list(exported.platforms) != list(metadata.get("platforms", [])):
        _fail(path, f"metadata lists platforms {metadata.get('platforms')}, the function was lowered for "
                    f"{list(exported.platforms)}")
    recorded = metadata["params"]
    if len(params) != len(recorded["shapes"]) or any(
            list(p.shape) != s or p.dtype.name != d for p, s, d in zip(params, recorded["shapes"], recorded["dtypes"])):
        _fail(path, "the stored parameters do not match the shapes and dtypes the metadata lists")
    if params_sha256(params) != recorded["sha256"]:
        _fail(path, "the parameters' sha256 differs from the one in the metadata (damaged or altered parameters)")
    in_avals, out_avals = exported.in_avals, exported.out_avals
    if len(in_avals) != len(params) + 1 or any(
            tuple(a.shape) != p.shape or a.dtype != p.dtype for a, p in zip(in_avals, params)):
        _fail(path, "the function's parameter arguments do not match the stored parameters")
    window, channels = metadata["inference"]["window"], len(metadata["input"]["modalities"])
    x = in_avals[-1]
    if len(x.shape) != 5 or export.is_symbolic_dim(x.shape[0]) is False or list(x.shape[1:]) != [*window, channels]:
        _fail(path, f"the function takes windows of shape {x.shape}, the metadata says (batch, {window}, {channels})")
    stages = metadata["output"]["attention_stages"]
    probs, maps = out_avals[0], out_avals[1:]
    if list(probs.shape[1:]) != [*window, 3] or len(maps) != stages:
        _fail(path, f"the function returns {[a.shape for a in out_avals]}, the metadata says probabilities "
                    f"(batch, {window}, 3) and {stages} stage(s) of attention maps")
