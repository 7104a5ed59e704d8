"""One interface for every path a run reads or writes: local paths and gs:// URIs alike.

Local paths behave exactly as the os / shutil calls they replace (os.path.join, os.path.abspath,
os.makedirs, open, tmp + os.replace). A path with a scheme (gs://BUCKET/...) goes through
etils.epath — the path library Orbax uses for its own directories — whose gs:// backend is gcsfs
(tf.io.gfile instead where TensorFlow is installed). Such a path never meets os.path.abspath or
os.makedirs, so no local folder named `gs:` is ever created.

Object storage differs from a file system in three ways this module accounts for:
- no append: MetricsFile keeps metrics.jsonl whole and rewrites it (see its docstring);
- no rename, but one object upload is atomic (the object appears only once complete), so
  write_bytes / write_text are atomic on both backends;
- no folders: makedirs is a no-op there, and a "folder" exists once something is written in it.

Also here: the TensorBoard writer for either backend (summary_writer), the start-up check that
every process of a run sees the same workdir (check_shared_workdir) and the copy of a prepared
data folder from a bucket to local disk (stage_data_dir).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import time
import uuid

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

log = logging.getLogger(__name__)


def _disable_gcs_listing_cache():
    # gcsfs caches directory listings per process; a file another host wrote after this process
    # listed its folder would stay invisible (exists() False, listdir() without it). Runs share
    # their workdir between hosts, so every lookup asks the bucket. An explicit setting wins.
    try:
        import fsspec.config
    except ImportError:
        return
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_disable_gcs_listing_cache()


# ---------------------------------------------------------------------------------------------
# Retries

class StorageUnavailable(OSError):
    """Object storage kept failing with transient errors past the retry bound."""


# Seconds a storage operation keeps being retried through transient errors (429, 5xx, resets,
# timeouts) before the run stops; train sets it from config.storage.retry_secs. gcsfs itself retries
# each request 6 times over about 31 s, so each attempt here already rides out short blips.
_retry = {"secs": 600.0}
_inside = threading.local()


def set_retry_secs(secs: float) -> None:
    _retry["secs"] = float(secs)


def _transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:
        from gcsfs.retry import is_retriable
    except ImportError:
        return False
    return is_retriable(e)


def _retried(op: str):
    """Retries the decorated operation on a remote path through transient errors, with backoff
    (1 s doubling to 32 s), for up to the retry bound; past it raises StorageUnavailable naming
    the operation and the URI(s). Operations nested in a retried one are retried by the outer one
    only, so the bound holds for the whole. Every operation decorated is safe to repeat."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            uris = [os.fspath(a) for a in args if isinstance(a, (str, os.PathLike)) and is_remote(a)]
            if not uris or getattr(_inside, "active", False):
                return fn(*args, **kwargs)
            start, delay, failed = time.monotonic(), 1.0, False
            _inside.active = True
            try:
                while True:
                    try:
                        return fn(*args, **kwargs)
                    except FileNotFoundError:
                        if op == "remove" and failed:  # an attempt cut short had removed it already
                            return None
                        raise
                    except Exception as e:  # noqa: BLE001 - sorted by _transient
                        if not _transient(e):
                            raise
                        failed = True
                        waited = time.monotonic() - start
                        if waited + delay > _retry["secs"]:
                            raise StorageUnavailable(
                                f"{op} {' -> '.join(uris)}: object storage kept failing for {waited:.0f} s "
                                f"(storage.retry_secs = {_retry['secs']:g}); last error {type(e).__name__}: "
                                f"{str(e)[:300]}. The run stops here; the same command resumes it from its "
                                "last checkpoint.") from e
                        log.warning("%s %s: %s: %s; retrying in %.0f s", op, uris[0], type(e).__name__,
                                    str(e)[:200], delay)
                        time.sleep(delay)
                        delay = min(2 * delay, 32.0)
            finally:
                _inside.active = False
        return run
    return decorate


# ---------------------------------------------------------------------------------------------
# The two backends

def is_remote(path) -> bool:
    """True for a URI with a scheme (gs://bucket/x), False for a local path."""
    return bool(_SCHEME.match(os.fspath(path)))


class _Local:
    """A local (or shared) file system: the os / shutil calls, writes through a temporary file and
    os.replace, conditional writes under an exclusive flock of PATH.lock."""

    join = staticmethod(os.path.join)
    basename = staticmethod(os.path.basename)
    dirname = staticmethod(os.path.dirname)
    abspath = staticmethod(os.path.abspath)
    exists = staticmethod(os.path.exists)
    isdir = staticmethod(os.path.isdir)
    isfile = staticmethod(os.path.isfile)

    @staticmethod
    def makedirs(path):
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def listdir(path):
        return sorted(os.listdir(path))

    @staticmethod
    def open_read(path):
        return open(path, "rb")

    @staticmethod
    def read_bytes(path):
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    @contextlib.contextmanager
    def open_write(path):
        """A file object whose content appears at path only once the block ends without an error
        (a temporary file beside it, then os.replace); on any error nothing is left."""
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    remove = staticmethod(os.remove)
    rmtree = staticmethod(shutil.rmtree)

    @staticmethod
    @contextlib.contextmanager
    def _locked(path):
        import fcntl

        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _versioned(path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def read_versioned(self, path):
        return self._versioned(path)  # the file is replaced whole, so a read needs no lock

    def write_if(self, path, data, if_version):
        with self._locked(path):
            if self._versioned(path)[1] != if_version:
                return None
            with self.open_write(path) as f:
                f.write(data)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, path, if_version):
        with self._locked(path):
            if self._versioned(path)[1] != if_version:
                return False
            os.remove(path)
        return True


class _Cloud:
    """Object storage (gs://): etils.epath, the path library Orbax uses for its own directories
    (its gs:// backend is gcsfs, or tf.io.gfile where TensorFlow is installed); server-side copies
    and cancellable uploads through gcsfs; conditional writes on object generations through
    google-cloud-storage (which gcsfs depends on). One upload is atomic: an object appears only
    once complete. There are no folders: a "folder" exists once something is written under it."""

    join = staticmethod(posixpath.join)
    basename = staticmethod(posixpath.basename)
    dirname = staticmethod(posixpath.dirname)

    @staticmethod
    def abspath(path):
        # Already absolute; without a trailing slash, as os.path.abspath drops a local one.
        stripped = path.rstrip("/")
        return path if stripped.endswith(":") else stripped  # gs:// alone stays as it is

    @staticmethod
    def _epath(path):
        from etils import epath

        # epath's gs:// backend: tf.io.gfile where TensorFlow is installed, else gcsfs.
        if path.startswith("gs://") and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
            raise ImportError(f"{path}: gs:// paths need gcsfs: `pip install -e .[gcs]` (or `pip install gcsfs`)")
        return epath.Path(path)

    @staticmethod
    def fs(path):
        """(gcsfs file system, path without the scheme) of a gs:// URI."""
        import fsspec

        return fsspec.core.url_to_fs(path)

    def exists(self, path):
        return self._epath(path).exists()

    def isdir(self, path):
        return self._epath(path).is_dir()

    def isfile(self, path):
        return self._epath(path).is_file()

    def makedirs(self, path):
        pass  # a name prefix exists once an object is written under it

    def listdir(self, path):
        names = [p.name for p in self._epath(path).iterdir()]
        if not names:
            raise FileNotFoundError(f"{path}: no such folder")
        return sorted(names)

    def open_read(self, path):
        return self._epath(path).open("rb")

    def read_bytes(self, path):
        return self._epath(path).read_bytes()

    @contextlib.contextmanager
    def open_write(self, path):
        """An upload committed only when the block ends without an error; on any error it is
        cancelled, so the object is whole or absent (an existing one unchanged)."""
        fs, key = self.fs(path)
        fout = fs.open(key, "wb")
        try:
            yield fout
        except BaseException:
            # Closing (as `with` would) commits what was written so far as if it were the whole
            # file; discarding cancels the upload. closed, even if discarding fails, keeps the
            # file's finaliser from committing it after all.
            try:
                fout.discard()
            finally:
                fout.closed = True
            raise
        fout.close()

    def write_bytes(self, path, data):
        self._epath(path).write_bytes(data)

    def remove(self, path):
        p = self._epath(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such file")
        p.unlink()

    def rmtree(self, path):
        self._epath(path).rmtree()

    @staticmethod
    def _blob(path):
        from google.cloud import storage as gcs

        bucket, _, name = path.removeprefix("gs://").partition("/")
        return gcs.Client().bucket(bucket), name

    def read_versioned(self, path):
        from google.api_core import exceptions

        bucket, name = self._blob(path)
        while True:
            blob = bucket.get_blob(name)
            if blob is None:
                return None, None
            try:
                return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                continue  # changed between the two calls: read the new one

    def write_if(self, path, data, if_version):
        from google.api_core import exceptions

        bucket, name = self._blob(path)
        blob = bucket.blob(name)
        try:
            blob.upload_from_string(data, if_generation_match=if_version or 0)
        except exceptions.PreconditionFailed:
            return None
        return blob.generation

    def delete_if(self, path, if_version):
        from google.api_core import exceptions

        bucket, name = self._blob(path)
        try:
            bucket.blob(name).delete(if_generation_match=if_version)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            return False
        return True


_LOCAL, _CLOUD = _Local(), _Cloud()


def _backend(path):
    return _CLOUD if is_remote(path) else _LOCAL


# ---------------------------------------------------------------------------------------------
# Paths, reads and writes: the interface every module uses, whichever the backend

def join(path, *parts) -> str:
    """os.path.join for local paths; '/'-joined for URIs (gs://b/run + ckpt -> gs://b/run/ckpt)."""
    path = os.fspath(path)
    return _backend(path).join(path, *map(os.fspath, parts))


def abspath(path) -> str:
    """os.path.abspath for local paths; a URI is already absolute and comes back without a
    trailing slash (gs://b/run/ -> gs://b/run), as os.path.abspath drops a local one."""
    path = os.fspath(path)
    return _backend(path).abspath(path)


def basename(path) -> str:
    path = os.fspath(path)
    return _backend(path).basename(path)


def dirname(path) -> str:
    path = os.fspath(path)
    return _backend(path).dirname(path)


@_retried("exists")
def exists(path) -> bool:
    return _backend(path).exists(os.fspath(path))


@_retried("isdir")
def isdir(path) -> bool:
    """True for a local folder; for a URI, True once at least one object lies under it."""
    return _backend(path).isdir(os.fspath(path))


@_retried("isfile")
def isfile(path) -> bool:
    """os.path.isfile for local paths; for a URI, True where an object has exactly that name."""
    return _backend(path).isfile(os.fspath(path))


def makedirs(path) -> None:
    """os.makedirs(path, exist_ok=True). Nothing to do on object storage: a folder there is a
    name prefix, which exists once an object is written under it."""
    _backend(path).makedirs(os.fspath(path))


@_retried("listdir")
def listdir(path) -> list[str]:
    """Sorted names of the entries directly inside path; FileNotFoundError if there are none
    (a URI) or it does not exist (a local path)."""
    return _backend(path).listdir(os.fspath(path))


@_retried("read")
def read_bytes(path) -> bytes:
    return _backend(path).read_bytes(os.fspath(path))


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


@_retried("write")
def write_bytes(path, data: bytes) -> None:
    """Writes data to path atomically: readers see the old content or the new, never a part.
    Local: a temporary file beside it, then os.replace; object storage: one upload."""
    path = os.fspath(path)
    if is_remote(path):
        _CLOUD.write_bytes(path, data)
        return
    with _LOCAL.open_write(path) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    """write_bytes of the UTF-8 text (atomic on both backends)."""
    write_bytes(path, text.encode("utf-8"))


def open_write(path):
    """A context manager giving a binary file object whose content appears at path only once the
    block ends without an error; on any error (a full disk, a kill signal turned into an
    exception) nothing is left and an existing file is unchanged. Not retried: a failed write is
    the caller's to repeat."""
    path = os.fspath(path)
    return _backend(path).open_write(path)


@_retried("remove")
def remove(path) -> None:
    """Removes one file; FileNotFoundError if it does not exist."""
    _backend(path).remove(os.fspath(path))


@_retried("rmtree")
def rmtree(path) -> None:
    """Removes path and everything under it."""
    _backend(path).rmtree(os.fspath(path))


# Conditional writes: what a lease needs on either backend. A version is opaque (a hash of the
# content locally, the object's generation in Cloud Storage); None stands for "no file".

def read_versioned(path) -> tuple[bytes | None, object]:
    """(content, version) of path, or (None, None) where there is none."""
    path = os.fspath(path)
    return _backend(path).read_versioned(path)


def write_if(path, data: bytes, if_version) -> object:
    """Writes data to path (atomically) if its version is still if_version (None: only if there
    is no file); returns the new version, or None if path changed since that version was read."""
    path = os.fspath(path)
    return _backend(path).write_if(path, data, if_version)


def delete_if(path, if_version) -> bool:
    """Removes path if its version is still if_version; False if it changed or is gone."""
    path = os.fspath(path)
    return _backend(path).delete_if(path, if_version)


def _same_store(src, dst) -> bool:
    return is_remote(src) and is_remote(dst) and src.split("://")[0] == dst.split("://")[0] == "gs"


@_retried("copy")
def copy_tree(src, dst) -> None:
    """Copies the folder src into dst (created, or merged into: files of the same name are
    replaced). Within Cloud Storage the copies are server-side (nothing streams through this
    process); a copy cut short leaves src whole and can be run again."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _same_store(src, dst):
        fs, src_key = _CLOUD.fs(src)
        _, dst_key = _CLOUD.fs(dst)
        fs.copy(src_key.rstrip("/") + "/", dst_key.rstrip("/") + "/", recursive=True)
        return
    for name in listdir(src):
        if isdir(join(src, name)):
            copy_tree(join(src, name), join(dst, name))
        else:
            copy_file(join(src, name), join(dst, name))


def move(src, dst) -> None:
    """Moves the file or folder src to dst, which must not exist yet (as shutil.move, locally).
    Object storage has no rename: each object is copied (server-side within a bucket), then src
    is removed, so a move cut short leaves src whole (and part of dst)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not (is_remote(src) or is_remote(dst)):
        shutil.move(src, dst)
        return
    if is_remote(src) and isdir(src):
        copy_tree(src, dst)
        rmtree(src)
    else:
        copy_file(src, dst)
        remove(src)


@_retried("copy")
def copy_file(src, dst, chunk_bytes: int = 64 << 20) -> None:
    """Copies one file between any two backends, streaming in chunks (shards can be GBs), and
    atomically as write_bytes: dst appears only once whole, and a copy that fails half-way
    leaves no dst (nor changes an existing one). Within Cloud Storage the copy is server-side."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _same_store(src, dst):
        fs, src_key = _CLOUD.fs(src)
        fs.copy(src_key, _CLOUD.fs(dst)[1])
        return
    with _backend(src).open_read(src) as fin, _backend(dst).open_write(dst) as fout:
        shutil.copyfileobj(fin, fout, chunk_bytes)


# ---------------------------------------------------------------------------------------------
# NIfTI volumes, from and to either backend

def read_nifti(path):
    """The NIfTI image at path (.nii or .nii.gz, told by the gzip magic number), read whole into
    memory and parsed from there, with its file's sha256: (image, sha256 hex digest)."""
    import nibabel as nib

    raw = read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return nib.Nifti1Image.from_bytes(raw), digest


def write_nifti_gz(img, path) -> None:
    """Writes the NIfTI image as .nii.gz, atomically (write_bytes). The gzip header's time stamp
    is fixed so that equal images give equal files."""
    write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


# ---------------------------------------------------------------------------------------------
# metrics.jsonl

class MetricsFile:
    """metrics.jsonl: one JSON object per line, each with an integer "step", in writing order.

    Local file: every append is appended to the file at once, as before.
    Object storage has no append, so the file is kept whole in memory and rewritten — one
    single-object upload, atomic — at most every `flush_secs` seconds on append, and on flush().
    The caller flushes whenever it saves a checkpoint (and at the end): the rows a resumed run
    keeps (step <= its checkpoint) are then always in the bucket, and the rows a kill loses are
    only ones a resume would drop and log again. Why not one object per row or per segment:
    every reader (sweeps, pandas, jq) would have to list and merge them; the whole file is small
    (~150 bytes a row: 3,000 rows of a 150k-step run at log_every 50 are under 0.5 MB), so one
    upload a minute costs little.

    A last line torn by a kill (a local append cut short) is dropped with a warning (to `warn`,
    a callable taking the message; default: this module's logger) when the file is read; an
    unreadable line elsewhere is an error naming the file and line.
    """

    def __init__(self, path, flush_secs: float = 60.0, warn=None):
        self.path = os.fspath(path)
        self.flush_secs = flush_secs
        self._warn = warn or log.warning
        self._remote = is_remote(self.path)
        self._lines: list[str] | None = None  # object storage: the file's lines, once read
        self._dirty = False
        self._last_flush = time.monotonic()

    def _load(self) -> tuple[str, list[str]]:
        """(the file's text, its complete lines each ending in a newline, a torn last line
        dropped); ("", []) where there is no file yet."""
        if self._lines is not None:
            text = "".join(self._lines)
            return text, list(self._lines)
        try:
            text = read_text(self.path)
        except FileNotFoundError:
            return "", []
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a JSON object with an integer step")
                if last and not line.endswith("\n"):
                    raise ValueError("no newline at the end")
            except ValueError as e:
                if last:
                    self._warn(f"{self.path}: dropping its last line, cut short (the run was killed "
                               f"while writing it?): {line[:200]!r}")
                    lines.pop()
                    break
                raise ValueError(f"{self.path}, line {i + 1}: {e}: {line[:200]!r}") from None
        return text, lines

    def rows(self) -> list[dict]:
        """Every row, in order (including rows not flushed yet)."""
        return [json.loads(line) for line in self._load()[1]]

    def append(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        if not self._remote:
            with open(self.path, "a") as f:
                f.write(line)
            return
        if self._lines is None:
            self._lines = self._load()[1]
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Object storage: uploads the whole file if rows were appended since the last upload.
        Local: nothing to do (appends are written at once)."""
        if self._remote and self._dirty:
            write_text(self.path, "".join(self._lines))
            self._dirty = False
        self._last_flush = time.monotonic()

    def truncate_after(self, step: int) -> int:
        """Drops every row with step > `step` (and a torn last line), rewriting the file
        atomically; returns how many rows were dropped. Nothing is written if nothing changes."""
        raw, lines = self._load()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if self._remote:
            self._lines = kept
        if "".join(kept) != raw:
            write_text(self.path, "".join(kept))
            self._dirty = False
        return len(lines) - len(kept)


# ---------------------------------------------------------------------------------------------
# TensorBoard

def summary_writer(logdir, sync_secs: float = 60.0):
    """A tensorboardX SummaryWriter whose event files end up in logdir.

    Local logdir: tensorboardX's own writer, as before. URI logdir: the events are written to a
    local staging folder and each changed event file is uploaded whole to logdir on flush() —
    at most every `sync_secs` seconds — and on close(). (tensorboardX 2.6 can write gs:// itself,
    through google-cloud-storage, but re-uploads the whole file on every flush, from the training
    loop, and again when the writer is garbage-collected.) Events logged since the last upload
    are lost if the process is killed, as they are with any buffered writer.
    """
    from tensorboardX import SummaryWriter

    logdir = os.fspath(logdir)
    if not is_remote(logdir):
        return SummaryWriter(logdir)

    import tempfile

    class _MirroredSummaryWriter(SummaryWriter):
        def __init__(self):
            self.remote_logdir = logdir
            self.staging = tempfile.mkdtemp(prefix="segguided-tb-")
            self._uploaded: dict[str, tuple] = {}
            self._last_sync = time.monotonic()
            # Event files are named by the second they were opened in; the random suffix keeps a
            # writer (a resumed run) from overwriting another's file in the bucket.
            super().__init__(self.staging, filename_suffix=f".{uuid.uuid4().hex[:8]}")

        def sync(self):
            """Uploads every event file that changed since its last upload."""
            for root, _, files in os.walk(self.staging):
                for name in files:
                    local = os.path.join(root, name)
                    st = os.stat(local)
                    if self._uploaded.get(local) == (st.st_size, st.st_mtime_ns):
                        continue
                    rel = os.path.relpath(local, self.staging).replace(os.sep, "/")
                    copy_file(local, join(self.remote_logdir, rel))
                    self._uploaded[local] = (st.st_size, st.st_mtime_ns)
            self._last_sync = time.monotonic()

        def flush(self):
            super().flush()
            if time.monotonic() - self._last_sync >= sync_secs:
                self.sync()

        def close(self):
            if self.staging is None:
                return
            super().close()
            self.sync()
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    return _MirroredSummaryWriter()


# ---------------------------------------------------------------------------------------------
# Multi-process runs

class WorkdirNotShared(RuntimeError):
    """The processes of a run do not see the same workdir."""


def check_shared_workdir(workdir) -> None:
    """Stops a multi-process run at once if its processes do not all see the same workdir.

    Process 0 writes a token file with a random value into workdir; after a barrier every other
    process reads it; the outcome is gathered so that every process raises WorkdirNotShared
    (with the same message) or none does. A collective: every process must call it. Nothing to
    check with one process.
    """
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    workdir = os.fspath(workdir)
    nonce = np.frombuffer(uuid.uuid4().bytes, np.int32).copy()  # 4 int32: no 64-bit types needed
    nonce = np.asarray(multihost_utils.broadcast_one_to_all(nonce))
    value = "".join(f"{int(x) & 0xFFFFFFFF:08x}" for x in nonce)
    token = join(workdir, f".shared-workdir-check-{value[:12]}")
    if jax.process_index() == 0:
        makedirs(workdir)
        write_text(token, value)
    multihost_utils.sync_global_devices("segguided_jax.storage.check_shared_workdir: token written")
    if jax.process_index() == 0:
        seen = True
    else:
        try:
            seen = read_text(token) == value
        except FileNotFoundError:
            seen = False
    seen_by = np.asarray(multihost_utils.process_allgather(np.array([seen], np.int32))).reshape(-1)
    if jax.process_index() == 0:
        with contextlib.suppress(FileNotFoundError):
            remove(token)
    blind = [i for i, s in enumerate(seen_by) if not s]
    if blind:
        raise WorkdirNotShared(
            f"workdir {workdir} is not shared between the processes of this run: process(es) "
            f"{', '.join(map(str, blind))} of {len(seen_by)} cannot see the file "
            f"{basename(token)} that process 0 wrote there. All processes write the checkpoints "
            f"and resume from them, so they must all see one workdir: use a bucket "
            f"(--workdir=gs://BUCKET/runs/NAME) or a folder on a file system every host mounts "
            f"at the same path (NFS, a gcsfuse mount of the bucket).")


# ---------------------------------------------------------------------------------------------
# Data

def _manifest_fingerprint(data_dir) -> str | None:
    """The fingerprint in data_dir/manifest.json, or None where there is no readable manifest."""
    try:
        return json.loads(read_text(join(data_dir, "manifest.json")))["fingerprint"]
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
        return None


def stage_data_dir(src, local_dir, log_fn=print) -> str:
    """Copies a prepared data folder (manifest.json, splits.json, shards) from src (gs:// or
    another local path, e.g. a network mount) to local_dir on this host's disk and returns
    local_dir. Nothing is copied when local_dir already holds a copy with the same manifest
    fingerprint. The copy is made in a temporary folder beside local_dir and renamed into place
    when whole, so a killed copy is never mistaken for a complete one, and several processes on
    one host may call it at once.
    """
    src, local_dir = os.fspath(src), os.fspath(local_dir)
    if is_remote(local_dir):
        raise ValueError(f"stage_data_dir: the copy goes to a local folder, not {local_dir}")
    local_dir = os.path.abspath(local_dir)
    wanted = _manifest_fingerprint(src)
    if wanted is None:
        raise FileNotFoundError(f"{join(src, 'manifest.json')}: no manifest with a fingerprint; is {src} "
                                "a folder written by `python -m data_prep.convert`?")
    if _manifest_fingerprint(local_dir) == wanted:
        return local_dir
    names = [n for n in listdir(src) if not n.endswith(".tmp") and not isdir(join(src, n))]
    names.sort(key=lambda n: n == "manifest.json")  # the manifest last: its presence means complete
    os.makedirs(os.path.dirname(local_dir), exist_ok=True)
    partial = f"{local_dir}.partial{os.getpid()}"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    t0 = time.time()
    try:
        for name in names:
            copy_file(join(src, name), os.path.join(partial, name))
        got = _manifest_fingerprint(partial)
        if got != wanted:
            raise RuntimeError(f"{src} changed while it was being copied (fingerprint {wanted[:12]}… "
                               f"became {str(got)[:12]}…); run again")
        if os.path.exists(local_dir):
            if _manifest_fingerprint(local_dir) == wanted:  # another process finished first
                return local_dir
            stale = f"{local_dir}.stale{os.getpid()}"
            os.rename(local_dir, stale)
            shutil.rmtree(stale)
        try:
            os.rename(partial, local_dir)
        except OSError:
            if _manifest_fingerprint(local_dir) != wanted:
                raise
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    size = sum(os.path.getsize(os.path.join(local_dir, n)) for n in os.listdir(local_dir))
    log_fn(f"staged {src} -> {local_dir} ({len(names)} files, {size / 2**20:.0f} MiB, "
           f"{time.time() - t0:.0f}s; fingerprint {wanted[:12]}…)")
    return local_dir
