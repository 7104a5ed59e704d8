#!/usr/bin/env bash
# The test suite, from a fresh clone: set up .venv, then pytest (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Without the oneDNN custom-call flag (segguided_jax/runtime.py): programs compiled with it cannot be
# written to the persistent compilation cache, and the tests' tiny steps are compile-bound, so every
# test would compile the train step afresh (tiny train step: 7.5 s to compile, 1.3 s from the
# cache). The demo and training keep the package's default flags.
export SEGGUIDED_CPU_FLAGS=cacheable
python -m pytest -q --durations=15 "$@"
