#!/usr/bin/env bash
# The test suite, from a fresh clone: set up .venv, then pytest (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q "$@"
