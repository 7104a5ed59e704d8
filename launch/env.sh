# Sourced by the demo and test commands: creates ./.venv on first use and (re)installs the
# project whenever pyproject.toml, the extras or the interpreter change, then activates it and
# sets the runtime environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# The interpreter: SEGGUIDED_PYTHON if given, else the first Python >= 3.12 that runs and can make
# a venv, else python3. Python 3.12 gets jax 0.12, whose oneDNN convolutions make the CPU train
# step ~4.5x faster than jax 0.10.2, the newest jax pip resolves on Python 3.11 (synthetic config
# at 32³, benchmarks/vs_monai.py --ours_python=...: 478 ms against 2335 ms). A pyenv shim such as
# python3.12 exists even when that version is not selected and then fails, hence the check that
# each candidate really runs.
_segguided_python() {
  if [ -n "${SEGGUIDED_PYTHON:-}" ]; then echo "$SEGGUIDED_PYTHON"; return; fi
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}" cand
  for cand in python3.12 python3.13 \
      $(ls -d "$pyenv_root"/versions/3.12*/bin/python3 "$pyenv_root"/versions/3.13*/bin/python3 2>/dev/null) \
      python3; do
    if "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      echo "$cand"; return
    fi
  done
  echo python3
}
PYTHON="$(_segguided_python)"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$PY_VERSION" ]; then
  echo "setup: $VENV has another Python than $PYTHON ($PY_VERSION); recreating it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version) ($PYTHON)"
  "$PYTHON" -m venv "$VENV"
fi
EXTRAS="${SEGGUIDED_EXTRAS:-test}"  # test,cuda on NVIDIA GPUs; test,tpu on Cloud TPU VMs
STAMP="$VENV/.installed-$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS $PY_VERSION") | sha1sum | cut -c1-12)"
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
# libtpu for deviceless TPU compilation (segguided_jax.compile_check --topology, the TPU compile
# test) on x86-64 Linux: installed next to the venv, not into it, so that JAX on a CPU machine
# never finds a TPU plugin at start-up; only code that asks for a TPU topology points
# TPU_LIBRARY_PATH at it. The version is the one the installed jax's `tpu` extra pins. On a TPU VM
# (the `tpu` extra) libtpu is a normal dependency and this copy is not used.
LIBTPU_DIR="$VENV/libtpu"
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [[ ",$EXTRAS," == *,test,* ]] \
   && [ ! -f "$LIBTPU_DIR/.installed-$(basename "$STAMP")" ]; then
  LIBTPU_REQ="$("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
print(next((r.split(";")[0].replace(" ", "") for r in requires("jax") or [] if r.startswith("libtpu") and 'extra == "tpu"' in r), ""))
PY
)"
  if [ -n "$LIBTPU_REQ" ]; then
    echo "setup: installing $LIBTPU_REQ into $LIBTPU_DIR (TPU compiler for deviceless compiles)"
    rm -rf "$LIBTPU_DIR"
    if "$VENV/bin/python" -m pip install --no-deps --target "$LIBTPU_DIR" "$LIBTPU_REQ" >>"$VENV/install.log" 2>&1; then
      touch "$LIBTPU_DIR/.installed-$(basename "$STAMP")"
    else
      echo "setup: could not install $LIBTPU_REQ (see $VENV/install.log); TPU compile checks will skip" >&2
    fi
  fi
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# XLA's CPU flags are applied by the package itself when imported (segguided_jax/runtime.py), so
# an activated .venv, an installed wheel and this script run equally fast.
# Compiled XLA programs are reused across runs (start-up from ~45 s to ~10 s on this CPU).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}"
cd "$ROOT"
