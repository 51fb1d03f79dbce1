#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker, and
# jax.distributed.initialize() finds its peers from the TPU metadata.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/kl_f8.py gs://BUCKET/runs/kl_f8 [--config.x=y ...]
#
# The repository must be present at the same path on every worker (e.g. cloned by a
# startup script); the workdir should be a gs:// path that every worker can write.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [overrides...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO_DIR=${REPO_DIR:-~/ldm_jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  cd $REPO_DIR
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e '.[tpu]'
  python -m ldm_jax.main --config=$CONFIG --workdir=$WORKDIR $*
"
