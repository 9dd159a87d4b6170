#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh [--dry-run] [up|follow|status|stop|delete] [MAIN_FLAGS...]
#
# Runs `python -m mars_jax.main --config=$CONFIG --workdir=$WORKDIR MAIN_FLAGS...` on every worker
# of a Cloud TPU VM slice at once, detached: closing this terminal or losing the ssh connection
# does not stop it. jax.distributed.initialize() finds the other workers from the TPU metadata.
#
#   up      (default) Create the slice, or reuse it when READY; a PREEMPTED or TERMINATED slice
#           (Spot) cannot restart, so it is deleted and created again; CREATING/REPAIRING/...
#           is waited for. Copy this checkout to every worker, build a virtual environment there
#           with a Python new enough for jax (launch/tpu_worker.sh setup: uv, pinned jax[tpu]
#           with libtpu, `pip install -e` of the copied checkout), then start the run detached.
#           Each worker logs to ~/mars_jax-runs/$RUN_NAME/worker-N.log.
#   follow  Stream every worker's log here, lines prefixed [worker N]; Ctrl-C stops following,
#           not the run.
#   status  Each worker: running or not, and its log's last lines.
#   stop    SIGTERM on every worker: the engine saves the current step and exits 143 (SIGKILL
#           after STOP_TIMEOUT_S). Rerun `up` with the same WORKDIR to resume.
#   delete  Delete the slice (QUEUED=1: its queued resource too).
#
#   PROJECT=my-proj ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 TPU_NAME=mars BUCKET=my-bucket \
#     launch/tpu_pod.sh --config.autoregressor.train.steps=100000
#   PROJECT=my-proj ZONE=us-east5-a TPU_NAME=mars launch/tpu_pod.sh follow
#
# Environment (PROJECT and ZONE always; BUCKET for up):
#   PROJECT           GCP project
#   ZONE              TPU zone, e.g. us-east5-a (v5p), us-east1-d (v6e), us-central2-b (v4)
#   ACCELERATOR_TYPE  slice type, e.g. v5p-64 (default), v6e-256, v5litepod-16, v4-32
#   TPU_NAME          TPU VM name (default mars-jax)
#   BUCKET            GCS bucket (no gs://) for the workdir and the NSynth copy
#   RUNTIME_VERSION   TPU VM image (default by accelerator: v6e v2-alpha-tpuv6e, v5p
#                     v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base)
#   CONFIG            config file (default configs/large.py)
#   RUN_NAME          run folder under gs://$BUCKET/mars_jax/ and log folder (default large)
#   WORKDIR           override the workdir (default gs://$BUCKET/mars_jax/$RUN_NAME)
#   DATA_PATH         NSynth root (default gs://$BUCKET/nsynth)
#   PYTHON_VERSION    the workers' venv interpreter, provided by uv (default 3.12; >= 3.11)
#   JAX_SPEC          jax requirement installed with the checkout (default jax[tpu]==0.10.2)
#   SPOT=1            Spot capacity (preemptible: rerun `up` and it recreates the slice, resumes)
#   QUEUED=1          request the slice as a queued resource (waits for capacity; recommended)
#   AUTOCHECKPOINT=1  gcloud alpha ... --autocheckpoint-enabled: SIGTERM before maintenance
#                     events (Cloud TPU Autocheckpoint, preview; v2-v4 and v5e)
#   FORWARD_ENV       more local variable names to pass to the run; always passed when set:
#                     MARS_* (not the MARS_COORDINATOR/NUM_PROCESSES/PROCESS_ID of local.sh),
#                     XLA_FLAGS, LIBTPU_INIT_ARGS, TPU_STDERR_LOG_LEVEL, TPU_MIN_LOG_LEVEL
#   STOP_TIMEOUT_S    how long stop waits for the save before SIGKILL (default 600)
#   POLL_S, WAIT_READY_S  slice state polling interval and limit (default 30, 3600; a queued
#                     request outlives the limit: rerun `up` later and it waits again)
#   DRY_RUN=1         print the gcloud commands instead of running them (or --dry-run)
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
ACTION=up
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,49p' "$0"; exit 0 ;;
    up|follow|status|stop|delete)
      if ((${#args[@]})); then args+=("$a"); else ACTION="$a"; fi ;;
    *) args+=("$a") ;;
  esac
done

: "${PROJECT:?set PROJECT (GCP project)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
TPU_NAME="${TPU_NAME:-mars-jax}"
CONFIG="${CONFIG:-configs/large.py}"
RUN_NAME="${RUN_NAME:-large}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==0.10.2}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
AUTOCHECKPOINT="${AUTOCHECKPOINT:-0}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-600}"
POLL_S="${POLL_S:-30}"
WAIT_READY_S="${WAIT_READY_S:-3600}"

runtime_for() {
  # Cloud TPU's software version for JAX per TPU generation (cloud.google.com/tpu/docs/runtimes).
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  RUNTIME_VERSION="$(runtime_for "$ACCELERATOR_TYPE")" \
    || { echo "tpu_pod.sh: no default runtime for $ACCELERATOR_TYPE; set RUNTIME_VERSION" >&2; exit 2; }
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/mars_jax-src.tar.gz"
gtpu=(gcloud compute tpus tpu-vm)
gqr=(gcloud compute tpus queued-resources)
if [[ "$AUTOCHECKPOINT" == 1 ]]; then
  gtpu=(gcloud alpha compute tpus tpu-vm)
  gqr=(gcloud alpha compute tpus queued-resources)
fi
where=(--project="$PROJECT" --zone="$ZONE")

show() {
  # Prints a command so it can be pasted back into a shell, quoting only arguments that need it.
  local safe='^[A-Za-z0-9_./:=@,+%^-]+$' out=() a q="'"
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

on_workers() {
  # One shell command on every worker at once, e.g. on_workers "cd mars_jax && ...".
  run "${gtpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

worker_env() {
  # `env RUN_NAME=... K=V ...` for the variables the workers should see, shell-quoted.
  local names=() n pairs=("RUN_NAME=$RUN_NAME" "STOP_TIMEOUT_S=$STOP_TIMEOUT_S")
  while IFS= read -r n; do
    case "$n" in MARS_COORDINATOR|MARS_NUM_PROCESSES|MARS_PROCESS_ID) ;; *) names+=("$n") ;; esac
  done < <(compgen -v MARS_ || true)
  names+=(XLA_FLAGS LIBTPU_INIT_ARGS TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL)
  # shellcheck disable=SC2206  # FORWARD_ENV is a space-separated list of names
  names+=(${FORWARD_ENV:-})
  for n in "${names[@]}"; do
    if [[ -n "${!n+set}" ]]; then pairs+=("$n=${!n}"); fi
  done
  show env "${pairs[@]}"
}

slice_state() {
  "${gtpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || true
}

create_slice() {
  local extra=()
  if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
  if [[ "$AUTOCHECKPOINT" == 1 ]]; then extra+=(--autocheckpoint-enabled); fi
  echo "tpu_pod.sh: $ACCELERATOR_TYPE uses runtime $RUNTIME_VERSION"
  if [[ "$QUEUED" == 1 ]]; then
    run "${gqr[@]}" create "$TPU_NAME" --node-id="$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
  else
    run "${gtpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${extra[@]}"
  fi
}

delete_slice() {
  if [[ "$QUEUED" == 1 ]]; then
    run "${gqr[@]}" delete "$TPU_NAME" "${where[@]}" --force --quiet
  else
    run "${gtpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

qr_state() {
  "${gqr[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state.state)' 2>/dev/null || true
}

recreate_slice() {
  echo "tpu_pod.sh: $TPU_NAME is $1; a preempted slice cannot restart: deleting it and creating" \
       "it again (the run resumes from $WORKDIR)"
  delete_slice
  create_slice
}

ensure_slice() {
  # READY: reuse. Absent: create. PREEMPTED/TERMINATED (a queued resource SUSPENDED/FAILED):
  # delete, create. In transition (CREATING, REPAIRING, waiting for capacity): wait for READY.
  local state qr waited=0 created=0
  if [[ "$DRY_RUN" == 1 ]]; then create_slice; return; fi
  while true; do
    state="$(slice_state)"
    case "$state" in
      READY)
        ((created)) || echo "tpu_pod.sh: reusing $TPU_NAME (READY)"
        return ;;
      PREEMPTED|TERMINATED)
        recreate_slice "$state"
        created=1 ;;
      "")
        if [[ "$QUEUED" == 1 ]]; then
          qr="$(qr_state)"
          case "$qr" in
            "")
              if ((created)); then echo "tpu_pod.sh: queued resource $TPU_NAME vanished" >&2; exit 1; fi
              create_slice
              created=1 ;;
            SUSPENDING|SUSPENDED|FAILED) recreate_slice "a $qr queued resource"; created=1 ;;
            *) echo "tpu_pod.sh: queued resource $TPU_NAME is $qr; waiting for its slice" ;;
          esac
        elif ((created)); then
          echo "tpu_pod.sh: $TPU_NAME vanished after create" >&2
          exit 1
        else
          create_slice
          created=1
        fi ;;
      CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING)
        echo "tpu_pod.sh: $TPU_NAME is $state; waiting for READY" ;;
      *)
        echo "tpu_pod.sh: $TPU_NAME is $state; fix it or run 'tpu_pod.sh delete' first" >&2
        exit 1 ;;
    esac
    if ((waited >= WAIT_READY_S)); then
      echo "tpu_pod.sh: $TPU_NAME not READY after ${WAIT_READY_S}s (last: ${state:-absent})" >&2
      exit 1
    fi
    sleep "$POLL_S"
    waited=$((waited + (POLL_S > 0 ? POLL_S : 1)))
  done
}

worker_cmd() {
  # The command line that runs launch/tpu_worker.sh ACTION in the installed checkout.
  echo "cd mars_jax && $(worker_env) bash launch/tpu_worker.sh $*"
}

case "$ACTION" in
  follow|status|stop)
    on_workers "$(worker_cmd "$ACTION")"
    exit 0 ;;
  delete)
    delete_slice
    exit 0 ;;
esac

: "${BUCKET:?set BUCKET (a GCS bucket name, no gs://)}"
WORKDIR="${WORKDIR:-gs://$BUCKET/mars_jax/$RUN_NAME}"
DATA_PATH="${DATA_PATH:-gs://$BUCKET/nsynth}"

# 1. The slice.
ensure_slice

# 2. This checkout (tracked files at HEAD plus uncommitted changes) to every worker; there it
#    replaces ~/mars_jax and is installed into ~/mars_jax-venv (tpu_worker.sh setup).
if [[ "$DRY_RUN" != 1 ]]; then
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -T - -czf "$TARBALL")
fi
run "${gtpu[@]}" scp "$TARBALL" "$TPU_NAME:mars_jax-src.tar.gz" "${where[@]}" --worker=all
setup="rm -rf mars_jax.new && mkdir mars_jax.new && tar -xzf mars_jax-src.tar.gz -C mars_jax.new"
setup+=" && $(show env "PYTHON_VERSION=$PYTHON_VERSION" "JAX_SPEC=$JAX_SPEC" "RUN_NAME=$RUN_NAME")"
setup+=" bash mars_jax.new/launch/tpu_worker.sh setup"
on_workers "$setup"

# 3. The same command on every worker, detached.
main=("--config=$CONFIG" "--workdir=$WORKDIR" "--config.data.path=$DATA_PATH" "${args[@]}")
on_workers "$(worker_cmd start "$(show "${main[@]}")")"
[[ "$DRY_RUN" == 1 ]] && exit 0
echo "tpu_pod.sh: running on every worker of $TPU_NAME, detached; logs: ~/mars_jax-runs/$RUN_NAME/"
echo "  follow: launch/tpu_pod.sh follow   status: launch/tpu_pod.sh status   stop: launch/tpu_pod.sh stop"
echo "  (with the same PROJECT, ZONE, TPU_NAME and RUN_NAME)"
