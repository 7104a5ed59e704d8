"""A run that stops making progress ends with a message instead of hanging.

A multi-process step blocks inside a collective until every process joins it: a peer that is alive
but stuck (a deadlocked collective, a hung read) keeps the heartbeats of jax.distributed going, so
nothing else ever stops the run. The loop tells the Watchdog each time it gets somewhere (a step
done, a validation case scored, a checkpoint saved); a thread beside it ends the process when

- no progress came for `stall_s` seconds (config train.stall_timeout_s), or
- a preemption notice (SIGTERM, to this process or, with jax.distributed, to any of the run's) is
  `grace_s` seconds old (config train.preempt_grace_s) and the loop has made no progress since:
  the notice asks for a checkpoint at the next step, which a stuck run never reaches, and a
  scheduler that sent SIGTERM waits only so long before SIGKILL.

It ends the process with os._exit: a stuck collective would also hang the interpreter's clean
exit (jax.distributed's shutdown barrier). Checkpoints are written atomically, so the last one
is intact and the same command resumes from it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

STALLED_EXIT_CODE = 75  # EX_TEMPFAIL: the same command may well succeed (it resumes)


class Watchdog:
    """beat(what) after each piece of progress; close() when the loop is done. stall_s or grace_s
    None (or 0) turns that bound off. `preempted()` says whether a preemption notice has arrived;
    it is polled from the watchdog's thread, so it must not touch devices."""

    def __init__(self, stall_s: float | None, grace_s: float | None, preempted: Callable[[], bool],
                 poll_s: float = 1.0, process_index: int = 0, exit: Callable[[int], None] = os._exit):
        self.stall_s, self.grace_s, self.preempted = stall_s or None, grace_s or None, preempted
        self.poll_s, self.process_index, self._exit = poll_s, process_index, exit
        self.last, self.what = time.monotonic(), "the start of the run"
        self.noticed_at: float | None = None
        self._stop = threading.Event()
        self._thread = None
        if self.stall_s or self.grace_s:
            self._thread = threading.Thread(target=self._watch, name="segguided-watchdog", daemon=True)
            self._thread.start()

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            idle = now - self.last
            if self.stall_s and idle > self.stall_s:
                return self._fail(
                    f"no progress for {idle:.0f} s (train.stall_timeout_s={self.stall_s:g}) since {self.what}: "
                    "a process of the run is stuck (a collective that a peer never joins, a read that never "
                    "returns)")
            if self.grace_s and self.noticed_at is None and self.preempted():
                self.noticed_at = now
            if self.grace_s and self.noticed_at is not None:
                since = now - max(self.noticed_at, self.last)
                if since > self.grace_s:
                    return self._fail(
                        f"preemption notice (SIGTERM) {now - self.noticed_at:.0f} s ago and no progress since "
                        f"{self.what}: the run cannot reach the step where it would save "
                        f"(train.preempt_grace_s={self.grace_s:g})")

    def _fail(self, why: str) -> None:
        print(f"error: process {self.process_index}: {why}. Stopping; the last checkpoint is intact and the "
              f"same command resumes from it.", file=sys.stderr, flush=True)
        self._exit(STALLED_EXIT_CODE)
