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

The run log on either backend is segguided_jax.io.runlog; the multi-host checks are
segguided_jax.parallel.multihost; the copy of a prepared data folder to local disk is
segguided_jax.data.staging.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import logging
import os
import posixpath
import re
import shutil
import threading
import time

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
