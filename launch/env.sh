# Sourced by the demo and test commands: creates ./.venv on first use and (re)installs the
# project whenever pyproject.toml, the extras or the interpreter change, then activates it and
# sets the runtime environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# The interpreter: the lock (lock/*.txt, made by launch/relock.sh) is resolved for CPython 3.12 on
# x86-64 Linux, so the first Python 3.12 that runs and can make a venv. A pyenv shim such as
# python3.12 exists even when that version is not selected and then fails, hence the check that
# each candidate really runs. SEGGUIDED_PYTHON forces another interpreter: a 3.12 one installs the
# lock as well; any other version installs from pyproject.toml's ranges, unlocked, and says so.
_segguided_python() {
  if [ -n "${SEGGUIDED_PYTHON:-}" ]; then echo "$SEGGUIDED_PYTHON"; return; fi
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}" cand
  for cand in python3.12 $(ls -d "$pyenv_root"/versions/3.12*/bin/python3 2>/dev/null) python3; do
    # A venv's Python (another project's, activated) stands for the interpreter it was made from:
    # the new venv is made from that one, whose pip installs uv.
    if "$cand" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      "$cand" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))'; return
    fi
  done
  echo "setup: no Python 3.12 found (the lock's interpreter); set SEGGUIDED_PYTHON to one" >&2
  return 1
}
PYTHON="$(_segguided_python)"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$PY_VERSION" ]; then
  echo "setup: $VENV has another Python than $PYTHON ($PY_VERSION); recreating it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version) ($PYTHON)"
  "$PYTHON" -m venv --without-pip "$VENV"
fi
# Which lock file holds the extras asked for: test (demo, tests, training) by default; test,tpu on
# a Cloud TPU VM (libtpu inside the venv). Other extras have no lock and resolve unlocked.
EXTRAS="${SEGGUIDED_EXTRAS:-test}"
case "$EXTRAS" in
  test) LOCKFILE="$ROOT/lock/test.txt" ;;
  test,tpu|tpu,test) LOCKFILE="$ROOT/lock/all.txt" ;;
  *) LOCKFILE="" ;;
esac
if [ "$PY_VERSION" != 3.12 ] || [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
  LOCKFILE=""
fi
LIBTPU_LOCK="$ROOT/lock/libtpu.txt"
CUDA_LOCK="$ROOT/lock/cuda.txt"
# Every install compiles the packages' bytecode (--compile-bytecode): with PYTHONDONTWRITEBYTECODE
# set (as on this project's CI machines) Python never writes it on import, so every process would
# compile every module it imports from source: 2.7 s of CPU per process to import the trainer
# (4.7 s against 2.0 s measured on the 2-core CI machine), paid by each of the tests' and the demo's
# processes. "bytecode" in the stamp reinstalls venvs made before.
STAMP="$VENV/.installed-$( (cat "$ROOT/pyproject.toml" "$ROOT/lock/uv.txt" ${LOCKFILE:+"$LOCKFILE"};   echo "$EXTRAS $PY_VERSION bytecode") | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  # uv, itself pinned with its hashes in lock/uv.txt, installs the lock exactly (and in seconds);
  # it lives beside the venv's packages, not among them, so that syncing never removes it.
  UV="$VENV/tools/bin/uv"
  if [ -z "$LOCKFILE" ]; then
    echo "setup: NO LOCK for Python $PY_VERSION on $(uname -s) $(uname -m) with extras '$EXTRAS' (the lock is" \
         "for Python 3.12 on x86-64 Linux, extras test or test,tpu): resolving pyproject.toml's ranges" \
         "instead; package versions, and so the README's figures, may differ" >&2
  else
    echo "setup: installing the lock ${LOCKFILE#$ROOT/} into $VENV (first run only)"
  fi
  if ! {
      rm -rf "$VENV/tools"
      "$PYTHON" -m pip install --disable-pip-version-check --no-deps --require-hashes --target "$VENV/tools" \
        -r "$ROOT/lock/uv.txt"
      if [ -n "$LOCKFILE" ]; then
        "$UV" pip sync --python "$VENV/bin/python" --require-hashes --compile-bytecode "$LOCKFILE" \
          && "$UV" pip install --python "$VENV/bin/python" --no-deps -e "$ROOT"
      else
        "$UV" pip install --python "$VENV/bin/python" --compile-bytecode -e "$ROOT[$EXTRAS]"
      fi
    } >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"; echo "setup: install failed; full log in $VENV/install.log" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
# The deviceless compilers, for the test command (which sets SEGGUIDED_DEVICELESS=1) and for
# compile_check --topology / --gpu; the demo and training do not need them (330 MB of downloads).
DEVICELESS_STAMP="$VENV/.deviceless-$(cat "$LIBTPU_LOCK" "$CUDA_LOCK" | sha1sum | cut -c1-12)"
if [ "${SEGGUIDED_DEVICELESS:-0}" = 1 ] && [ ! -f "$DEVICELESS_STAMP" ]; then
  UV="$VENV/tools/bin/uv"
  # libtpu for deviceless TPU compilation (segguided_jax.compile_check --topology, the TPU compile
  # test) on x86-64 Linux: installed next to the venv, not into it, so that JAX on a CPU machine
  # never finds a TPU plugin at start-up; only code that asks for a TPU topology points
  # TPU_LIBRARY_PATH at it. Its version is the lock's (the one the locked jax's `tpu` extra pins).
  # On a TPU VM (the `tpu` extra) libtpu is a normal dependency and this copy is not used.
  _install_beside() {  # _install_beside DIR LOCK WHAT: LOCK's packages into $VENV/DIR, off the venv
    rm -rf "$VENV/$1"
    if [ -z "$LOCKFILE" ]; then
      echo "setup: no $3 without the lock: its compile checks cannot run (and fail under CI=true)" >&2
      return 0
    fi
    echo "setup: installing $(grep -m1 -oE '^[A-Za-z0-9_.-]+==[^ ]+' "$2") into $VENV/$1 ($3 for deviceless compiles)"
    if ! "$UV" pip install --python "$VENV/bin/python" --no-deps --require-hashes --compile-bytecode --target "$VENV/$1" \
         -r "$2" >>"$VENV/install.log" 2>&1; then
      tail -n 30 "$VENV/install.log"; echo "setup: could not install $3 (see $VENV/install.log)" >&2
      return 1
    fi
  }
  _install_beside libtpu "$LIBTPU_LOCK" "the TPU compiler (libtpu)" || { return 1 2>/dev/null || exit 1; }
  # JAX's CUDA plugin and its ptxas, for deviceless GPU compiles (compile_check --gpu), beside the
  # venv for the same reason as libtpu: a CUDA plugin found at start-up would look for a GPU.
  _install_beside cuda "$CUDA_LOCK" "the GPU compiler (JAX's CUDA plugin)" || { return 1 2>/dev/null || exit 1; }
  if [ -n "$LOCKFILE" ]; then
    rm -f "$VENV"/.deviceless-*
    touch "$DEVICELESS_STAMP"
  fi
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# The project's own modules, compiled likewise (only those changed since; the folders' __pycache__
# are ignored by git).
python -m compileall -q -j 0 "$ROOT/segguided_jax" "$ROOT/data_prep" "$ROOT/configs" "$ROOT/tests" \
  "$ROOT/benchmarks" "$ROOT/launch" >/dev/null

# XLA's CPU flags are applied by the package itself when imported (segguided_jax/runtime.py), so
# an activated .venv, an installed wheel and this script run equally fast.
# Compiled XLA programs are reused across runs (start-up from ~45 s to ~10 s on this CPU).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}"
cd "$ROOT"
