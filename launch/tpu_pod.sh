#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker, and
# jax.distributed.initialize() finds its peers from the TPU metadata.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/kl_f8.py gs://BUCKET/runs/kl_f8 [--config.x=y ...]
#
# The repository must be present at the same path on every worker (e.g. cloned by a
# startup script); the workdir must be a gs:// path that every worker can write (the
# workers' service account needs storage access to the bucket). Checkpoints, config.json,
# TensorBoard events, image grids and the export all go there (README, "On a pod").
#
# Mesh: by default the data axis spans every chip (`train.mesh.data=-1, fsdp=1`);
# configs too large to replicate (ldm_txt2img) split their state over each host's chips
# (`fsdp="host"`). On a multi-slice job add --config.train.mesh.dcn_data=NUM_SLICES so
# that only the gradient all-reduce crosses the data-centre network.
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
