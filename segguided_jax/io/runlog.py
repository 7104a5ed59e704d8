"""The run log: metrics.jsonl (MetricsFile) and the TensorBoard events (summary_writer), in a
local workdir or a bucket (segguided_jax.io.storage).

Object storage has no append and no rename, so both keep what they write locally or in memory and
upload it whole, atomically, at most once a period and when asked (see each one's docstring).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid

from segguided_jax.io import storage

log = logging.getLogger(__name__)


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
        self._remote = storage.is_remote(self.path)
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
            text = storage.read_text(self.path)
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
            storage.write_text(self.path, "".join(self._lines))
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
            storage.write_text(self.path, "".join(kept))
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
    if not storage.is_remote(logdir):
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
                    storage.copy_file(local, storage.join(self.remote_logdir, rel))
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
