"""A prepared data folder staged to this host's local disk (train --stage_data_dir): every sample
reads a whole case, so local reads keep the input pipeline fed where data.dir is a bucket."""
from __future__ import annotations

import json
import os
import shutil
import time

from segguided_jax.io import storage


def _manifest_fingerprint(data_dir) -> str | None:
    """The fingerprint in data_dir/manifest.json, or None where there is no readable manifest."""
    try:
        return json.loads(storage.read_text(storage.join(data_dir, "manifest.json")))["fingerprint"]
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
    if storage.is_remote(local_dir):
        raise ValueError(f"stage_data_dir: the copy goes to a local folder, not {local_dir}")
    local_dir = os.path.abspath(local_dir)
    wanted = _manifest_fingerprint(src)
    if wanted is None:
        raise FileNotFoundError(f"{storage.join(src, 'manifest.json')}: no manifest with a fingerprint; is {src} "
                                "a folder written by `python -m data_prep.convert`?")
    if _manifest_fingerprint(local_dir) == wanted:
        return local_dir
    names = [n for n in storage.listdir(src) if not n.endswith(".tmp") and not storage.isdir(storage.join(src, n))]
    names.sort(key=lambda n: n == "manifest.json")  # the manifest last: its presence means complete
    os.makedirs(os.path.dirname(local_dir), exist_ok=True)
    partial = f"{local_dir}.partial{os.getpid()}"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    t0 = time.time()
    try:
        for name in names:
            storage.copy_file(storage.join(src, name), os.path.join(partial, name))
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
