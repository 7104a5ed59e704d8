#!/usr/bin/env bash
# The test suite, from a fresh clone: set up .venv, then pytest (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Without the oneDNN custom-call flag: programs compiled with it cannot be written to the
# persistent compilation cache (std::bad_alloc), and the tests' tiny steps are compile-bound, so
# every test would compile the train step afresh (tiny train step: 7.5 s to compile, 1.3 s from
# the cache). The demo and training keep env.sh's flags.
export XLA_FLAGS="${XLA_FLAGS//--xla_cpu_experimental_onednn_custom_call=true/}"
python -m pytest -q "$@"
