#!/usr/bin/env bash
#SBATCH --job-name=mars_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=mars_jax-%j.out
#SBATCH --requeue
#SBATCH --signal=TERM@120
#
# Usage: sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G] launch/gpu_slurm.sh [MAIN_FLAGS...]
#        DRY_RUN=1 bash launch/gpu_slurm.sh [MAIN_FLAGS...]     (print, outside SLURM too)
#
# One process per GPU (ntasks-per-node must equal gpus-per-node). srun starts them all; each
# joins jax.distributed with the coordinator on the first node of the job, and jax binds task
# SLURM_LOCALID to its GPU. SIGTERM (preemption, time limit; --signal above) makes the engine
# save and exit 143; --requeue reruns the job, which resumes from the last checkpoint.
#
# Environment:
#   CONFIG       config file (default configs/large.py)
#   WORKDIR      shared output folder every node can read and write (default $PWD/runs/$SLURM_JOB_ID)
#   PORT         coordinator port (default 12355)
#   PYTHON       interpreter on the nodes (default python; activate your venv before sbatch)
#   DRY_RUN=1    print the srun command instead of running it (or pass --dry-run)
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '12,25p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done

JOB_ID="${SLURM_JOB_ID:-dryrun}"
NODELIST="${SLURM_JOB_NODELIST:-node[001-002]}"
NTASKS="${SLURM_NTASKS:-16}"
CONFIG="${CONFIG:-configs/large.py}"
WORKDIR="${WORKDIR:-$PWD/runs/$JOB_ID}"
PORT="${PORT:-12355}"
PYTHON="${PYTHON:-python}"

first_host() {
  # The first host of a SLURM node list: scontrol when present, else 'pre[001-004],x' -> pre001.
  if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    scontrol show hostnames "$1" | head -n 1
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

show() {
  # Prints a command so it can be pasted back into a shell, quoting only arguments that need it.
  local safe='^[][A-Za-z0-9_./:=@,+%^-]+$' out=() a q="'"
  for a in "$@"; do
    if [[ "$a" =~ $safe ]]; then out+=("$a"); else out+=("$q${a//$q/$q\\$q$q}$q"); fi
  done
  echo "${out[*]}"
}

COORDINATOR="$(first_host "$NODELIST"):$PORT"
export MARS_COORDINATOR="$COORDINATOR"
export MARS_NUM_PROCESSES="$NTASKS"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

main=("$PYTHON" -m mars_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${args[@]}")
# MARS_PROCESS_ID differs per task, so it is set inside the task from SLURM_PROCID.
# shellcheck disable=SC2016  # expanded by the task's shell, not here
task='export MARS_PROCESS_ID="$SLURM_PROCID"; exec "$@"'
run=(srun --kill-on-bad-exit=1 --ntasks="$NTASKS" bash -c "$task" mars_jax "${main[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "export MARS_COORDINATOR=$MARS_COORDINATOR MARS_NUM_PROCESSES=$MARS_NUM_PROCESSES"
  show "${run[@]}"
  exit 0
fi
mkdir -p "$WORKDIR"
exec "${run[@]}"
