#!/usr/bin/env bash
# N training processes on this machine, joined by jax.distributed over localhost (CPU collectives
# via gloo when the devices are CPUs). Each process gets DEVICES fake CPU devices unless
# XLA_FLAGS already names a device count.
#   bash launch/local.sh N [--devices D] [--port P] -- --config=configs/tiny.py --workdir=runs/mp ...
set -euo pipefail
N="$1"; shift
DEVICES=""; PORT="${PORT:-$(( 20000 + RANDOM % 20000 ))}"
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) echo "launch/local.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
if [ -n "$DEVICES" ] && [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < N; i++)); do
  python -m segguided_jax.train --coordinator_address="localhost:$PORT" --num_processes="$N" \
    --process_id="$i" "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
