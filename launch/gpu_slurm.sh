#!/usr/bin/env bash
#SBATCH --job-name=mars_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=mars_jax-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#
# Usage: sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G] launch/gpu_slurm.sh [MAIN_FLAGS...]
#        DRY_RUN=1 bash launch/gpu_slurm.sh [MAIN_FLAGS...]     (print, outside SLURM too)
#
# One process per GPU (ntasks-per-node must equal gpus-per-node). srun starts them all; each
# joins jax.distributed with the coordinator on the first node of the job (where this script
# runs, so the port is picked free there), and jax binds task SLURM_LOCALID to its GPU.
#
# Resuming: the workdir is named, not numbered (runs/$RUN_NAME), so a requeued or resubmitted job
# continues where the last one saved. 120 s before the time limit SLURM sends SIGTERM to this
# script (--signal=B:TERM@120), which passes it to the tasks: they save the step and exit 143,
# and this script then requeues the job (scontrol requeue; same job id, same workdir). A task that
# exits 143 for any other SIGTERM (preemption) requeues it too. Output appends to one file.
#
# Environment:
#   CONFIG          config file (default configs/large.py)
#   RUN_NAME        names the run (default the job name, mars_jax): the same name resumes
#   WORKDIR         shared output folder every node can read and write (default
#                   $SLURM_SUBMIT_DIR/runs/$RUN_NAME); a --workdir=... flag wins
#   PORT            coordinator port (default: a free port on the first node)
#   PYTHON          interpreter on the nodes (default python; activate your venv before sbatch)
#   LOADER_WORKERS  data loader processes per task (default SLURM_CPUS_PER_TASK - 1, so loaders
#                   plus the task fit its CPUs; a --config.data.loader_workers=N flag wins)
#   JAX_PLATFORMS   default cuda: a node whose jax has no CUDA plugin fails instead of training
#                   on CPU (checked before srun too)
#   XLA_FLAGS       --xla_gpu_enable_latency_hiding_scheduler=true is added (overlaps the fsdp
#                   all-gathers and gradient reduce-scatters with compute)
#   NCCL_*          passed through; NCCL_DEBUG defaults to WARN. Cluster-specific ones (e.g.
#                   NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are yours to set before sbatch
#   DRY_RUN=1       print the srun command instead of running it (or pass --dry-run)
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
args=()
workdir_flag=""
loader_flag=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '13,41p' "$0"; exit 0 ;;
    --workdir=*) workdir_flag="${a#--workdir=}" ;;
    --config.data.loader_workers=*) loader_flag="${a#*=}"; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done

JOB_ID="${SLURM_JOB_ID:-dryrun}"
NODELIST="${SLURM_JOB_NODELIST:-node[001-002]}"
NTASKS="${SLURM_NTASKS:-16}"
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-8}"
CONFIG="${CONFIG:-configs/large.py}"
RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-mars_jax}}"
WORKDIR="${workdir_flag:-${WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$RUN_NAME}}"
PYTHON="${PYTHON:-python}"

die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }

first_host() {
  # The first host of a SLURM node list: scontrol when present, else 'pre[001-004],x' -> pre001.
  if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    local hosts
    hosts="$(scontrol show hostnames "$1")"   # all of it: `| head -1` can SIGPIPE under pipefail
    echo "${hosts%%$'\n'*}"
    return
  fi
  local list="${1%%,*}"
  if [[ "$list" == *"["* ]]; then
    local prefix="${list%%\[*}" range="${1#*\[}"
    range="${range%%[],-]*}"
    echo "$prefix$range"
  else
    echo "$list"
  fi
}

free_port() {
  # A port nothing listens on, on this host (the batch script runs on the job's first node).
  local py
  for py in "$PYTHON" python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
      "$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' \
        && return
    fi
  done
  echo $((20000 + 10#${JOB_ID//[^0-9]/0} % 20000))
}

show() {
  # Prints a command so it can be pasted back into a shell, quoting only arguments that need it.
  local safe='^[][A-Za-z0-9_./:=@,+%^-]+$' out=() a q="'"
  for a in "$@"; do
    if [[ "$a" =~ $safe ]]; then out+=("$a"); else out+=("$q${a//$q/$q\\$q$q}$q"); fi
  done
  echo "${out[*]}"
}

# Data loader processes: at most the task's CPUs minus one (the task itself).
if [[ -n "$loader_flag" ]]; then
  if ! [[ "$loader_flag" =~ ^[0-9]+$ ]] || ((loader_flag >= CPUS_PER_TASK && loader_flag > 0)); then
    die "--config.data.loader_workers=$loader_flag needs more than the $CPUS_PER_TASK CPUs per task" \
        "(--cpus-per-task); use at most $((CPUS_PER_TASK > 1 ? CPUS_PER_TASK - 1 : 0))"
  fi
else
  LOADER_WORKERS="${LOADER_WORKERS:-$((CPUS_PER_TASK > 1 ? CPUS_PER_TASK - 1 : 0))}"
  args=("--config.data.loader_workers=$LOADER_WORKERS" "${args[@]}")
fi

PORT="${PORT:-$(free_port)}"
COORDINATOR="$(first_host "$NODELIST"):$PORT"
export MARS_COORDINATOR="$COORDINATOR"
export MARS_NUM_PROCESSES="$NTASKS"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
if [[ "${XLA_FLAGS:-}" != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
fi

main=("$PYTHON" -m mars_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${args[@]}")
# MARS_PROCESS_ID differs per task, so it is set inside the task from SLURM_PROCID.
# shellcheck disable=SC2016  # expanded by the task's shell, not here
task='export MARS_PROCESS_ID="$SLURM_PROCID"; exec "$@"'
run=(srun --kill-on-bad-exit=1 --ntasks="$NTASKS" bash -c "$task" mars_jax "${main[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "export MARS_COORDINATOR=$MARS_COORDINATOR MARS_NUM_PROCESSES=$MARS_NUM_PROCESSES" \
       "JAX_PLATFORMS=$JAX_PLATFORMS $(show "XLA_FLAGS=$XLA_FLAGS")"
  show "${run[@]}"
  exit 0
fi

# A CPU-only jax on a GPU node would train on CPU (slowly, and alone): refuse before srun.
if [[ "$JAX_PLATFORMS" == *cuda* || "$JAX_PLATFORMS" == *gpu* ]]; then
  "$PYTHON" - <<'EOF' || die "the jax in $PYTHON has no CUDA plugin; pip install 'jax[cuda12]' (or cuda13)"
import importlib.util, sys
def found(name):
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False
sys.exit(0 if any(found(m) for m in ('jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13')) else 1)
EOF
fi

mkdir -p "$WORKDIR"
echo "gpu_slurm.sh: job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) of run '$RUN_NAME' in $WORKDIR;" \
     "coordinator $COORDINATOR, $NTASKS tasks"

# SIGTERM (time limit via --signal=B:TERM@120, scancel --signal=TERM --batch) reaches only this
# shell: pass it to srun, which passes it to every task; they save and exit 143.
got_term=0
srun_pid=""
# shellcheck disable=SC2317  # called by the trap
on_term() {
  got_term=1
  echo "gpu_slurm.sh: SIGTERM; asking the tasks to save and stop" >&2
  if [[ -n "$srun_pid" ]]; then kill -TERM "$srun_pid" 2>/dev/null || true; fi
}
trap on_term TERM
"${run[@]}" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do   # the trap interrupted `wait`: wait for the save
  rc=0
  wait "$srun_pid" || rc=$?
done
trap - TERM

if [[ "$rc" == 143 || "$got_term" == 1 ]]; then
  echo "gpu_slurm.sh: exit $rc after SIGTERM; requeueing job $JOB_ID (resumes from $WORKDIR)" >&2
  scontrol requeue "$JOB_ID" \
    || echo "gpu_slurm.sh: scontrol requeue failed; resubmit with RUN_NAME=$RUN_NAME to resume" >&2
fi
exit "$rc"
