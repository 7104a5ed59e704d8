#!/usr/bin/env bash
# Re-resolves the lock (lock/*.txt) from pyproject.toml's ranges against what the package index
# serves today, prints every version that moved, and says which figures must be measured again.
#   bash launch/relock.sh            # re-resolve everything to the newest versions that fit
#   bash launch/relock.sh -P optax   # move one package (uv's --upgrade-package), keep the rest
# Run it on purpose (a new jax, a security fix), never as part of set-up; then run the demo and
# the suite and re-measure what the README's "Figures belong to the lock" section lists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/lock"
# The locked platform: CPython 3.12 on x86-64 Linux (glibc >= 2.31, which libtpu needs). uv
# records every file's hash for each pinned version, so other platforms with wheels still verify.
PY=3.12
PLATFORM=x86_64-manylinux_2_31
UPGRADE=(--upgrade)
if [ "${1:-}" = "-P" ]; then UPGRADE=(--upgrade-package "$2"); fi

TOOLS="$(mktemp -d)"; trap 'rm -rf "$TOOLS"' EXIT
PYTHON="$(command -v python3)"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --require-hashes --target "$TOOLS" \
  -r "$LOCK/uv.txt"
UV="$TOOLS/bin/uv"
compile() {  # compile OUT [uv pip compile arguments...]
  local out="$1"; shift
  (cd "$ROOT" && "$UV" pip compile --quiet --python-version "$PY" --python-platform "$PLATFORM" \
     --generate-hashes --no-emit-package segguided-jax --custom-compile-command "bash launch/relock.sh" \
     "$@" -o "$out")
}
versions() { cat "$@" 2>/dev/null | grep -oE '^[A-Za-z0-9_.-]+==[^ ;]+' | sort -u || true; }  # a missing file: no versions
versions "$LOCK/all.txt" "$LOCK/cuda.txt" >"$TOOLS/before"
# One resolution holds every extra at once, the TPU one included, so that jax is a version whose
# libtpu the index really has (jax[tpu] pins libtpu exactly); the other files take their versions
# from it.
compile lock/all.txt pyproject.toml --extra test --extra tpu "${UPGRADE[@]}"
compile lock/test.txt pyproject.toml --extra test -c lock/all.txt
compile lock/predict.txt pyproject.toml -c lock/all.txt
grep -E '^libtpu==' "$LOCK/all.txt" | cut -d' ' -f1 >"$LOCK/libtpu.in"
compile lock/libtpu.txt lock/libtpu.in --no-deps
rm "$LOCK/libtpu.in"
# JAX's CUDA plugin for deviceless GPU compiles (segguided_jax/compilation/gpu_compile.py), at the locked jax's
# own version, and the ptxas it compiles with; no CUDA runtime libraries, which need a GPU.
JAX_VERSION="$(grep -oE '^jax==[^ ]+' "$LOCK/all.txt" | cut -d= -f3)"
printf 'jax-cuda12-plugin==%s\njax-cuda12-pjrt==%s\nnvidia-cuda-nvcc-cu12\n' "$JAX_VERSION" "$JAX_VERSION" >"$LOCK/cuda.in"
compile lock/cuda.txt lock/cuda.in --no-deps
rm "$LOCK/cuda.in"

changed="$(diff "$TOOLS/before" <(versions "$LOCK/all.txt" "$LOCK/cuda.txt") || true)"
if [ -z "$changed" ]; then
  echo "relock: no version changed"
  exit 0
fi
echo "relock: versions that moved (< before, > now):"
echo "$changed" | grep -E '^[<>]'
cat <<'MSG'
relock: the lock moved. Before committing it, on this machine kind:
  - bash launch/demo.sh on a fresh clone: the README's held-out figures and parameter sha256
  - bash launch/tests.sh: the whole suite, and its time
  - if jax, jaxlib or libtpu moved: compile_check --topology (docs/tpu.md's tables) and the GPU
    figures (README "One GPU, end to end") belong to the old versions until re-measured
  - if jax or the CUDA plugin moved: compile_check --gpu (docs/gpu.md's tables)
MSG
