#!/usr/bin/env bash
# The test suite, from a fresh clone: set up .venv, then pytest (extra arguments go to pytest).
# The deviceless TPU and GPU compilers too (libtpu, JAX's CUDA plugin): the compile tests need them.
export SEGGUIDED_DEVICELESS=1
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Without the oneDNN custom-call flag (segguided_jax/runtime.py): programs compiled with it cannot be
# written to the persistent compilation cache, and the tests' tiny steps are compile-bound, so every
# test would compile the train step afresh (tiny train step: 7.5 s to compile, 1.3 s from the
# cache). The demo and training keep the package's default flags.
export SEGGUIDED_CPU_FLAGS=cacheable
# LLVM's optimisation off for the tests' CPU programs: the tiny train step compiles in 4.0 s instead
# of 5.7 and runs in 118 ms instead of 109 (oneDNN does the convolutions either way), and the
# tests' programs are compile-bound. Same last bits run to run; only the demo's bits are recorded.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
# Three test processes on 2 cores (pytest-xdist, a file at a time, longest first: tests/conftest.py):
# many tests spend their time waiting (a bucket outage outlasting gcsfs's retries, a watchdog's
# stall bound, a peer's heartbeat timeout), and a third process fills those waits. `-n 0` runs the
# suite in this one process.
python -m pytest -q --durations=15 -n "${SEGGUIDED_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
