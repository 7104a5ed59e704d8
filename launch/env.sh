# Sourced by the demo and test commands: creates ./.venv on first use and (re)installs the
# project whenever pyproject.toml changes, then activates it and sets the runtime environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${SEGGUIDED_PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
EXTRAS="${SEGGUIDED_EXTRAS:-test}"  # test,cuda on NVIDIA GPUs; test,tpu on Cloud TPU VMs
STAMP="$VENV/.installed-$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS") | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing segguided_jax and its dependencies into $VENV (first run only)"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip \
         && "$VENV/bin/python" -m pip install -e "$ROOT[$EXTRAS]"; } >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"; echo "setup: pip install failed; full log in $VENV/install.log" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# Compiled XLA programs are reused across runs (start-up from ~45 s to ~10 s on this CPU).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}"
cd "$ROOT"
