#!/usr/bin/env bash
# Training on a multi-host Cloud TPU VM slice: copies this checkout to every worker, installs it
# there (jax with TPU support), and starts the same command on all workers at once. The TPU
# runtime connects the hosts; the workdir should be a gs:// bucket or a shared file system.
#   bash launch/tpu_vm.sh TPU_NAME ZONE configs/brats21.py gs://BUCKET/runs/brats21 [--config.key=value ...]
set -euo pipefail
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse \
  "$ROOT" "$TPU":~/segguided_jax
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command="
  cd ~/segguided_jax && SEGGUIDED_EXTRAS=test,tpu source launch/env.sh &&
  python -m segguided_jax.train --config=$CONFIG --workdir=$WORKDIR $*"
