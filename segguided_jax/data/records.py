"""The record schema of the shards, the manifest beside them, and a source of decoded cases.

A record is one case. Format 2 (written by `encode_case`) is a flat layout that decodes without a
copy: the 8 bytes b"SGJREC2\n", a little-endian uint64 header length, a UTF-8 JSON header
{"format": 2, "case_id": str, "arrays": {name: {"dtype", "shape", "offset"}}}, then each array's
bytes (C order, offsets 64-byte aligned, from the record's start). The arrays:
  image        (X, Y, Z, 4) float32, z-scored per modality inside the brain, 0 outside, MODALITIES
               order; or, when the conversion's statistics reproduce it exactly (see below):
  image_int16  (X, Y, Z, 4) int16 raw intensities (0 outside the brain) and
  image_norm   (4, 2) float64 (mean, std) per channel: image = (raw - mean) / std inside the
               brain (any channel != 0), 0 outside, computed in float32 exactly as the conversion
               does, so decoding gives the float32 image bit for bit from half the bytes;
  label        (X, Y, Z) uint8 internal labels 0..3 (absent for prediction-only cases);
  fg_coords    (N, 3) int16 voxel coordinates of labels 1, 2, 3 (NCR, ED, ET) in that order,
  fg_counts    (3,) int64 how many of the N belong to each label,
  fg_totals    (3,) int64 how many voxels of each label the case has.
The foreground coordinates follow nnU-Net's preprocessing (`foreground_locations`): all voxels of
a label, or a random sample of max(10,000, 1 % of them); patch sampling draws from them instead of
searching the label map for every patch.
Format 1 (`np.savez` bytes with image, label, case_id) still reads; its foreground locations are
computed when a case is decoded, which costs a pass over the label map per decode: re-run the
conversion to store them.
(X, Y, Z) is the case's brain box, cropped from the original grid (`crop_box` in the manifest);
segguided_jax.data.preprocess.to_original_grid goes back.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence

import numpy as np

from segguided_jax.io import storage
from segguided_jax.data.brats import MODALITIES
from segguided_jax.data.splits import split_ids

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RECORD_FORMAT = 2
_MAGIC = b"SGJREC2\n"
_ALIGN = 64
FOREGROUND_LABELS = (1, 2, 3)  # NCR, ED, ET: the labels whose locations a record keeps
# nnU-Net's DefaultPreprocessor._sample_foreground_locations: at most 10,000 voxels per class,
# but never less than 1 % of them, drawn with a fixed seed (so a conversion is reproducible).
MAX_LOCATIONS = 10_000
MIN_LOCATION_COVERAGE = 0.01
LOCATION_SEED = 1234


@dataclasses.dataclass(frozen=True)
class ForegroundLocations:
    """Where a case's foreground labels are.

    coords[k]: (n_k, 3) integer voxel coordinates of label FOREGROUND_LABELS[k] (all of them or a
    uniform sample); totals[k]: the number of voxels of that label in the case."""
    coords: tuple
    totals: np.ndarray

    def present(self, classes) -> list[int]:
        """Indices of `classes` (each a tuple of internal labels) that have at least one voxel."""
        return [i for i, labels in enumerate(classes) if sum(self._total(l) for l in labels) > 0]

    def sample(self, labels, rng: np.random.Generator) -> np.ndarray:
        """One voxel (3,) int64, uniform over the voxels whose label is in `labels` (which must be
        present): a label drawn in proportion to its voxel count, then one of its stored voxels."""
        labels = tuple(labels)
        label = labels[0]
        if len(labels) > 1:
            totals = np.array([self._total(l) for l in labels], np.float64)
            label = labels[int(rng.choice(len(labels), p=totals / totals.sum()))]
        coords = self.coords[FOREGROUND_LABELS.index(label)]
        return coords[int(rng.integers(len(coords)))].astype(np.int64)

    def _total(self, label) -> int:
        return int(self.totals[FOREGROUND_LABELS.index(label)])


def foreground_locations(label: np.ndarray) -> ForegroundLocations:
    """label (X, Y, Z) integer -> the voxels of each of FOREGROUND_LABELS (see the module
    docstring for the sampling rule). Deterministic: the same label map gives the same result."""
    rng = np.random.default_rng(LOCATION_SEED)
    coords, totals = [], []
    for value in FOREGROUND_LABELS:
        idx = np.flatnonzero(label == value)
        n = idx.size
        keep = max(min(MAX_LOCATIONS, n), math.ceil(n * MIN_LOCATION_COVERAGE))
        if keep < n:
            idx = np.sort(rng.choice(idx, keep, replace=False))
        coords.append(np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int16))
        totals.append(n)
    return ForegroundLocations(tuple(coords), np.asarray(totals, np.int64))


def encode_case(case_id: str, image: np.ndarray, label: np.ndarray | None, *, norm=None) -> bytes:
    """One case -> record bytes (format 2; see the module docstring).

    image (X, Y, Z, C) float32 z-scored, label (X, Y, Z) internal labels or None. norm: the
    conversion's per-channel (mean, std), a sequence in channel order or a dict keyed by
    MODALITIES (the manifest's `norm`); when given, and the raw intensities it implies are
    integers that reproduce `image` exactly, the image is stored as int16 (half the bytes to read
    per case); otherwise as float32."""
    if image.ndim != 4 or (label is not None and label.shape != image.shape[:3]):
        raise ValueError(f"case {case_id}: image {image.shape} and label "
                         f"{None if label is None else label.shape} are not (X, Y, Z, C) and (X, Y, Z)")
    image = np.asarray(image, np.float32)
    arrays = {}
    raw = None if norm is None else _int16_encoding(image, _norm_array(norm, image.shape[-1]))
    if raw is None:
        arrays["image"] = image
    else:
        arrays["image_int16"], arrays["image_norm"] = raw, _norm_array(norm, image.shape[-1])
    if label is not None:
        label = label.astype(np.uint8)
        arrays["label"] = label
        fg = foreground_locations(label)
        arrays["fg_coords"] = np.concatenate(fg.coords)
        arrays["fg_counts"] = np.array([len(c) for c in fg.coords], np.int64)
        arrays["fg_totals"] = fg.totals
    return _pack({"format": RECORD_FORMAT, "case_id": case_id}, arrays)


def _pack(header: dict, arrays: dict) -> bytes:
    specs, offset = {}, 0
    for name, a in arrays.items():
        specs[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    text = json.dumps({**header, "arrays": specs}).encode()
    start = -(-(len(_MAGIC) + 8 + len(text)) // _ALIGN) * _ALIGN
    buf = bytearray(start + offset)
    buf[:len(_MAGIC)] = _MAGIC
    buf[len(_MAGIC): len(_MAGIC) + 8] = len(text).to_bytes(8, "little")
    buf[len(_MAGIC) + 8: len(_MAGIC) + 8 + len(text)] = text
    for name, a in arrays.items():
        o = start + specs[name]["offset"]
        buf[o: o + a.nbytes] = np.ascontiguousarray(a).tobytes()
    return bytes(buf)


def _unpack(record: bytes) -> tuple[dict, dict]:
    """Format-2 bytes -> (header, {name: read-only array viewing `record`})."""
    n = int.from_bytes(record[len(_MAGIC): len(_MAGIC) + 8], "little")
    header = json.loads(record[len(_MAGIC) + 8: len(_MAGIC) + 8 + n])
    start = -(-(len(_MAGIC) + 8 + n) // _ALIGN) * _ALIGN
    arrays = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        arrays[name] = np.frombuffer(record, dtype, count, start + spec["offset"]).reshape(spec["shape"])
    return header, arrays


@dataclasses.dataclass
class Case:
    """A decoded record. The image stays as stored (float32, or int16 with its statistics) until
    asked for, so a patch pays for normalising only the box it reads."""
    case_id: str
    shape: tuple  # (X, Y, Z)
    label: np.ndarray | None  # (X, Y, Z) uint8
    _image: np.ndarray | None  # (X, Y, Z, C) float32 when stored so
    _raw: np.ndarray | None  # (X, Y, Z, C) int16 when stored so
    _norm: np.ndarray | None  # (C, 2) float64
    _foreground: ForegroundLocations | None

    @property
    def channels(self) -> int:
        """C, the number of image channels."""
        return (self._image if self._image is not None else self._raw).shape[-1]

    @property
    def stored_dtype(self) -> str:
        """"float32" or "int16": how the record stores the image."""
        return "float32" if self._image is not None else "int16"

    @property
    def foreground(self) -> ForegroundLocations | None:
        """None for prediction-only cases; computed here for format-1 records."""
        if self._foreground is None and self.label is not None:
            self._foreground = foreground_locations(self.label)
        return self._foreground

    def image(self) -> np.ndarray:
        """The whole image, (X, Y, Z, C) float32 (read-only when stored as float32)."""
        if self._image is not None:
            return self._image
        return normalise(self._raw, self._norm)

    def channel_boxes(self, lo, hi) -> list[np.ndarray]:
        """image[lo:hi] channel by channel: C arrays (hi - lo) float32, 0 <= lo <= hi <= shape.
        Read-only views when stored as float32; new C-contiguous arrays (only the box normalised)
        when stored as int16."""
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        if self._image is not None:
            return [self._image[box + (c,)] for c in range(self.channels)]
        raw = self._raw[box]
        background = ~_brain(raw)
        out = []
        for c in range(self.channels):
            x = raw[..., c].astype(np.float32)
            x -= np.float32(self._norm[c, 0])
            x /= np.float32(max(self._norm[c, 1], 1e-8))
            np.copyto(x, np.float32(0), where=background)
            out.append(x)
        return out


    def stored_box(self, lo, hi, dtype: str = "int16") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """image[lo:hi] as stored, for normalising elsewhere (the accelerator), with the label's box:
        (box (hi - lo) + (C,) of `dtype`, label box (hi - lo) uint8 or None without a label, both 0
        outside the case, and (C, 2) float32 (mean, std) such that the image is (box - mean) / std
        where any channel is non-zero, 0 elsewhere (`normalise`, with its float32 rounding of both
        numbers)). lo may be negative and hi beyond the shape. dtype "int16" needs an int16 record;
        "float32" takes either (a float32 record ships its image with mean 0, std 1)."""
        if dtype not in ("int16", "float32"):
            raise ValueError(f"dtype must be int16 or float32, got {dtype!r}")
        if dtype == "int16" and self._raw is None:
            raise ValueError(f"case {self.case_id} is stored as float32 (its intensities are not integers, e.g. "
                             "after resampling), so its crops cannot ship as int16: set "
                             "data.device_crop_dtype=float32")
        stored = self._raw if self._raw is not None else self._image
        image = _padded_box(stored, lo, hi, dtype)
        label = None if self.label is None else _padded_box(self.label, lo, hi, np.uint8)
        if self._raw is None:
            norm = np.tile(np.array([0.0, 1.0], np.float32), (self.channels, 1))
        else:
            norm = np.stack([self._norm[:, 0].astype(np.float32),
                             np.maximum(self._norm[:, 1], 1e-8).astype(np.float32)], axis=1)
        return image, label, norm


def _padded_box(array: np.ndarray, lo, hi, dtype) -> np.ndarray:
    """array[lo:hi] over its first three axes as a new array of `dtype`, 0 where the box leaves it."""
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    out = np.zeros(tuple(hi - lo) + array.shape[3:], dtype)
    a, b = np.maximum(lo, 0), np.minimum(hi, array.shape[:3])
    if np.all(b > a):
        out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = array[tuple(slice(x, y) for x, y in zip(a, b))]
    return out


def normalise(raw: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """raw (..., C) int16 and norm (C, 2) (mean, std) -> float32 (raw - mean) / max(std, 1e-8)
    where any channel is non-zero (the brain), 0 elsewhere: segguided_jax.data.preprocess's float32
    arithmetic (a float32 array minus, then divided by, a float32-rounded scalar)."""
    mean = norm[:, 0].astype(np.float32)
    std = np.maximum(norm[:, 1], 1e-8).astype(np.float32)
    out = (raw.astype(np.float32) - mean) / std
    np.copyto(out, np.float32(0), where=~_brain(raw)[..., None])
    return out


def _brain(raw: np.ndarray) -> np.ndarray:
    """(..., 4) int16 -> (...) bool, any channel non-zero; the 4 channels read as one int64 when the
    layout allows (the channel axis contiguous), which is several times faster than any(axis=-1)."""
    if raw.shape[-1] == 4 and raw.strides[-1] == 2:
        return raw.view(np.int64)[..., 0] != 0
    return np.any(raw != 0, axis=-1)


def _norm_array(norm, channels: int) -> np.ndarray:
    if isinstance(norm, dict):
        norm = [norm[m] for m in MODALITIES]
    norm = np.asarray(norm, np.float64)
    if norm.shape != (channels, 2):
        raise ValueError(f"norm must hold (mean, std) for each of {channels} channels; got shape {norm.shape}")
    return norm


def _int16_encoding(image: np.ndarray, norm: np.ndarray) -> np.ndarray | None:
    """The int16 raw intensities that `normalise` maps back to `image` bit for bit, or None when
    there are none (non-integer intensities, e.g. after resampling, or values beyond int16)."""
    brain = np.any(image != 0, axis=-1)
    raw = np.rint(image.astype(np.float64) * np.maximum(norm[:, 1], 1e-8) + norm[:, 0])
    raw[~brain] = 0
    if raw.min() < np.iinfo(np.int16).min or raw.max() > np.iinfo(np.int16).max:
        return None
    raw = raw.astype(np.int16)
    back = normalise(raw, norm)
    if not np.array_equal(back.view(np.uint32), image.view(np.uint32)):  # bitwise, signed zeros too
        return None
    return raw


def read_case(record: bytes) -> Case:
    """Record bytes (format 1 or 2) -> Case. Format-2 arrays are read-only views of `record`."""
    if record[:len(_MAGIC)] == _MAGIC:
        header, arrays = _unpack(record)
        if header.get("format") != RECORD_FORMAT:
            raise ValueError(f"record format {header.get('format')}; this code reads {RECORD_FORMAT}: re-run "
                             "`python -m data_prep.convert` with this version")
        case_id = header["case_id"]
    elif record[:4] == b"PK\x03\x04":  # format 1: np.savez
        with np.load(io.BytesIO(record), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        case_id = str(arrays.pop("case_id"))
    else:
        raise ValueError(f"not a case record (starts with {record[:8]!r}): re-run `python -m data_prep.convert`")
    image, raw, norm = arrays.get("image"), arrays.get("image_int16"), arrays.get("image_norm")
    if (image is None) == (raw is None):
        raise ValueError(f"record of case {case_id} has arrays {sorted(arrays)}: expected one of image, image_int16")
    foreground = None
    if "fg_coords" in arrays:
        ends = np.cumsum(arrays["fg_counts"])
        foreground = ForegroundLocations(tuple(np.split(arrays["fg_coords"], ends[:-1])), arrays["fg_totals"])
    stored = image if image is not None else raw
    return Case(case_id, tuple(stored.shape[:3]), arrays.get("label"), image, raw, norm, foreground)


def decode_case(record: bytes) -> dict:
    """Record bytes -> {"image": (X, Y, Z, 4) float32, "case_id": str, "label": (X, Y, Z) uint8
    (absent for prediction-only cases)}: new writable arrays."""
    return _as_dict(read_case(record))


def _as_dict(case: Case) -> dict:
    out = {"image": np.array(case.image()), "case_id": case.case_id}  # writable, as np.load gave
    if case.label is not None:
        out["label"] = np.array(case.label)
    return out


def load_manifest(data_dir: str) -> dict:
    """manifest.json of a prepared folder (local or gs://)."""
    path = storage.join(data_dir, MANIFEST)
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run `python -m data_prep.convert --src ... --out {data_dir}` "
                                "first") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    return manifest


def shard_paths(data_dir: str, manifest: dict) -> list[str]:
    """The shards' paths; array_record reads gs:// shards itself."""
    return [storage.join(data_dir, s) for s in manifest["shards"]]


class CaseSource(Sequence):
    """Random access to the decoded cases of one part ("train", "val" or "test") of a split
    ("holdout", "fold0", ...; see segguided_jax.data.splits): a Grain-compatible data source.
    `source[i]` is `decode_case`'s dict; `source.case(i)` the lazily normalised `Case` the training
    pipeline uses."""

    def __init__(self, data_dir: str, part: str, split: str = "holdout", manifest: dict | None = None):
        from grain.sources import ArrayRecordDataSource  # array_record is heavy; import on use

        self.data_dir = data_dir
        self.manifest = manifest or load_manifest(data_dir)
        by_id = {c["id"]: c for c in self.manifest["cases"]}
        self.cases = [by_id[i] for i in split_ids(data_dir, split, part)]
        if not self.cases:
            raise ValueError(f"{data_dir}: no cases in the {part!r} part of split {split!r}")
        self._source = ArrayRecordDataSource(shard_paths(data_dir, self.manifest))

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        return _as_dict(self.case(i))

    def case(self, i) -> Case:
        meta = self.cases[i]
        try:
            case = read_case(self._source[meta["record"]])
        except Exception as e:  # zip, zlib and numpy raise many types for damaged bytes
            raise ValueError(f"{self.data_dir}: case {meta['id']} (record {meta['record']} in {meta.get('shard')}) "
                             f"cannot be decoded: {type(e).__name__}: {e}. Re-run `python -m data_prep.convert` "
                             f"into a new folder") from e
        if case.case_id != meta["id"]:
            raise ValueError(f"{self.data_dir}: record {meta['record']} holds case {case.case_id}, the manifest "
                             f"says {meta['id']}: the shards and manifest.json are from different conversions")
        return case

