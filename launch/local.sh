#!/usr/bin/env bash
# Usage: launch/local.sh [--dry-run] [-n N] [MAIN_FLAGS...]
#
# Starts N processes of `python -m mars_jax.main MAIN_FLAGS...` on this machine, joined by
# jax.distributed over 127.0.0.1 (the same path tests/test_multihost.py takes). Every process
# runs the same command; process 0 prints to the terminal, the others log to $LOG_DIR.
# On a multi-GPU host each process gets its own GPUs (CUDA_VISIBLE_DEVICES: G GPUs split into N
# equal blocks), instead of every process grabbing every GPU.
#
#   launch/local.sh -n 2 --config=configs/tiny.py --workdir=/tmp/mars
#
# Environment:
#   NUM_PROCESSES   processes to start (default 2; -n overrides)
#   PORT            coordinator port on 127.0.0.1 (default 12355)
#   CPU_DEVICES     if set, simulate this many CPU devices per process (JAX_PLATFORMS=cpu; other
#                   XLA_FLAGS are kept)
#   GPUS            comma-separated GPU ids to split over the processes (default: the
#                   CUDA_VISIBLE_DEVICES list, else every GPU nvidia-smi lists; none: no split)
#   LOG_DIR         logs of processes 1..N-1 (default ./launch-logs)
#   PYTHON          interpreter (default python)
#   DRY_RUN=1       print the commands instead of running them (same as --dry-run)
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
PORT="${PORT:-12355}"
LOG_DIR="${LOG_DIR:-launch-logs}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"

args=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -n) NUM_PROCESSES="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done

if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2
  exit 2
fi

cmd=("$PYTHON" -m mars_jax.main "${args[@]}")
pids=()

# GPUs of this host, split into one block per process (not with simulated CPU devices).
gpus=()
if [[ -z "${CPU_DEVICES:-}" ]]; then
  if [[ -n "${GPUS:-${CUDA_VISIBLE_DEVICES:-}}" ]]; then
    IFS=, read -r -a gpus <<<"${GPUS:-$CUDA_VISIBLE_DEVICES}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
  fi
fi
per_process=0
if ((${#gpus[@]} > 0 && NUM_PROCESSES > 1)); then
  if ((${#gpus[@]} % NUM_PROCESSES)); then
    echo "local.sh: $NUM_PROCESSES processes cannot split the ${#gpus[@]} GPUs (${gpus[*]}) evenly;" \
         "use -n dividing ${#gpus[@]}, or GPUS=..." >&2
    exit 2
  fi
  per_process=$((${#gpus[@]} / NUM_PROCESSES))
fi

show() {
  # Prints a command so it can be pasted back into a shell, quoting only arguments that need it.
  local safe='^[][A-Za-z0-9_./:=@,+%^-]+$' out=() a q="'"
  for a in "$@"; do
    if [[ "$a" =~ $safe ]]; then out+=("$a"); else out+=("$q${a//$q/$q\\$q$q}$q"); fi
  done
  echo "${out[*]}"
}

cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}

if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p "$LOG_DIR"
  trap cleanup EXIT INT TERM
fi

# With CPU_DEVICES, the caller's other XLA flags (dumps, optimisation level) stay.
xla_other="" xla_flags=()
read -r -a xla_flags <<<"${XLA_FLAGS:-}"
for flag in "${xla_flags[@]}"; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_other+="${xla_other:+ }$flag"
done

for ((i = 0; i < NUM_PROCESSES; i++)); do
  env_vars=(MARS_COORDINATOR="127.0.0.1:$PORT" MARS_NUM_PROCESSES="$NUM_PROCESSES"
            MARS_PROCESS_ID="$i")
  if [[ -n "${CPU_DEVICES:-}" ]]; then
    env_vars+=(JAX_PLATFORMS=cpu
               XLA_FLAGS="--xla_force_host_platform_device_count=$CPU_DEVICES${xla_other:+ $xla_other}")
  elif ((per_process > 0)); then
    mine="${gpus[*]:i*per_process:per_process}"
    env_vars+=(CUDA_VISIBLE_DEVICES="${mine// /,}")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    show env "${env_vars[@]}" "${cmd[@]}"
    continue
  fi
  if ((i == 0)); then
    env "${env_vars[@]}" "${cmd[@]}" &
  else
    env "${env_vars[@]}" "${cmd[@]}" >"$LOG_DIR/process-$i.log" 2>&1 &
  fi
  pids+=("$!")
done

[[ "$DRY_RUN" == 1 ]] && exit 0

# Wait for all; the first failure stops the rest (a lone survivor would wait on collectives).
status=0
for ((done = 0; done < ${#pids[@]}; done++)); do
  if ! wait -n; then
    status=1
    echo "local.sh: a process failed; stopping the others (logs in $LOG_DIR)" >&2
    cleanup
  fi
done
trap - EXIT INT TERM
exit "$status"
