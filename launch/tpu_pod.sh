#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh [--dry-run] [MAIN_FLAGS...]
#
# Creates (or reuses) a Cloud TPU VM slice, copies this checkout to every worker, installs it,
# and runs `python -m mars_jax.main --config=$CONFIG --workdir=$WORKDIR MAIN_FLAGS...` on all
# workers at once (--worker=all). jax.distributed.initialize() finds the other workers from the
# TPU metadata by itself; nothing per-worker is passed.
#
#   PROJECT=my-proj ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 TPU_NAME=mars BUCKET=my-bucket \
#     launch/tpu_pod.sh --config.autoregressor.train.steps=100000
#
# Environment (required: PROJECT, ZONE, BUCKET):
#   PROJECT           GCP project
#   ZONE              TPU zone, e.g. us-east5-a (v5p), us-central2-b (v4)
#   ACCELERATOR_TYPE  slice type, e.g. v5p-64 (default), v4-32, v5litepod-16
#   TPU_NAME          TPU VM name (default mars-jax); reused when it already exists
#   BUCKET            GCS bucket (no gs://) for the workdir and the NSynth copy
#   RUNTIME_VERSION   TPU VM image (default v2-alpha-tpuv5; v4: tpu-ubuntu2204-base)
#   CONFIG            config file (default configs/large.py)
#   RUN_NAME          run folder under gs://$BUCKET/mars_jax/ (default large)
#   WORKDIR           override the workdir (default gs://$BUCKET/mars_jax/$RUN_NAME)
#   DATA_PATH         NSynth root (default gs://$BUCKET/nsynth)
#   JAX_SPEC          pip requirement for jax on TPU (default jax[tpu])
#   SPOT=1            create a Spot slice (preemptible; rerun this script to resume)
#   DRY_RUN=1         print the gcloud commands instead of running them (or --dry-run)
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done

: "${PROJECT:?set PROJECT (GCP project)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
: "${BUCKET:?set BUCKET (a GCS bucket name, no gs://)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
TPU_NAME="${TPU_NAME:-mars-jax}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
CONFIG="${CONFIG:-configs/large.py}"
RUN_NAME="${RUN_NAME:-large}"
WORKDIR="${WORKDIR:-gs://$BUCKET/mars_jax/$RUN_NAME}"
DATA_PATH="${DATA_PATH:-gs://$BUCKET/nsynth}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
SPOT="${SPOT:-0}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/mars_jax-src.tar.gz"
gtpu=(gcloud compute tpus tpu-vm)
where=(--project="$PROJECT" --zone="$ZONE")

show() {
  # Prints a command so it can be pasted back into a shell, quoting only arguments that need it.
  local safe='^[][A-Za-z0-9_./:=@,+%^-]+$' out=() a q="'"
  for a in "$@"; do
    if [[ "$a" =~ $safe ]]; then out+=("$a"); else out+=("$q${a//$q/$q\\$q$q}$q"); fi
  done
  echo "${out[*]}"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

# 1. Create the slice unless it exists.
if [[ "$DRY_RUN" != 1 ]] && "${gtpu[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing $TPU_NAME"
else
  create=("${gtpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. Ship this checkout (tracked files at HEAD plus uncommitted changes) to every worker.
if [[ "$DRY_RUN" != 1 ]]; then
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -T - -czf "$TARBALL")
fi
run "${gtpu[@]}" scp "$TARBALL" "$TPU_NAME:mars_jax-src.tar.gz" "${where[@]}" --worker=all
install="mkdir -p mars_jax && tar -xzf mars_jax-src.tar.gz -C mars_jax && cd mars_jax"
install+=" && python3 -m pip install -q -U '$JAX_SPEC' && python3 -m pip install -q -e '.[gcs]'"
run "${gtpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$install"

# 3. The same command on every worker, at once.
main=(python3 -m mars_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
      "--config.data.path=$DATA_PATH" "${args[@]}")
main_str="$(show "${main[@]}")"
run "${gtpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="cd mars_jax && $main_str"
