#!/usr/bin/env bash
# Usage: launch/tpu_worker.sh setup|start|follow|status|stop [MAIN_FLAGS...]
#
# The per-worker half of launch/tpu_pod.sh: `gcloud ... ssh --worker=all` runs it on every TPU VM
# of the slice at once. You do not normally call it yourself.
#
#   setup   Moves the freshly unpacked checkout (the folder this script is in) to $CHECKOUT, makes
#           the virtual environment $VENV with Python $PYTHON_VERSION and installs the checkout
#           into it: `pip install -e '.[gcs]' "$JAX_SPEC"` (jax pinned; nothing else upgraded).
#           The interpreter comes from uv (a single binary from PyPI: `pip install --user uv`,
#           or astral.sh's installer where pip refuses), which downloads a standalone CPython
#           build when the image has none: the TPU VM images (Ubuntu 22.04) ship Python 3.10,
#           older than jax 0.10 / flax / orbax / grain need (3.11). PYTHON=/path/to/python3.11
#           uses that interpreter and `python -m venv` instead. Then checks that the interpreter
#           is new enough for setup.cfg's python_requires, that libtpu is installed, and that the
#           VM has TPU device files, so a worker never silently trains alone on CPU.
#           Refuses while a run is going on this worker (tpu_pod.sh stop first).
#   start   Starts `$VENV/bin/python -m mars_jax.main MAIN_FLAGS...` detached (setsid nohup:
#           it outlives the ssh session) with JAX_PLATFORMS=tpu (no TPU = an error, not a CPU
#           run), appending to $RUN_DIR/worker-N.log; its pid goes to $RUN_DIR/pid. Clears a stale
#           /tmp/libtpu_lockfile left by a killed run; refuses while the TPU is held.
#   follow  tail -F of this worker's log, each line prefixed "[worker N]".
#   status  "running" or "not running", and the log's last $LINES lines.
#   stop    SIGTERM to the run's main process (the engine saves the step and exits 143), waits
#           up to STOP_TIMEOUT_S, then SIGKILLs its whole process group (data loader workers).
#
# Environment:
#   CHECKOUT        the installed checkout (default $HOME/mars_jax)
#   VENV            virtual environment (default $HOME/mars_jax-venv)
#   PYTHON_VERSION  interpreter uv provides (default 3.12)
#   PYTHON          use this interpreter instead of uv (python -m venv)
#   JAX_SPEC        jax requirement (default 'jax[tpu]==0.10.2', with its matching libtpu)
#   RUN_NAME        names the log folder (default run); RUN_DIR (default $HOME/mars_jax-runs/$RUN_NAME)
#   WORKER_ID       this worker's number (default: the TPU metadata's agent-worker-number)
#   REQUIRE_TPU=0   skip the TPU device-file check and JAX_PLATFORMS=tpu (tests, CPU dry runs)
#   STOP_TIMEOUT_S  how long stop waits for the save (default 600); LINES (default 20)
#   DRY_RUN         not used here: tpu_pod.sh --dry-run prints the ssh commands that call this
set -euo pipefail

CHECKOUT="${CHECKOUT:-$HOME/mars_jax}"
VENV="${VENV:-$HOME/mars_jax-venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==0.10.2}"
RUN_NAME="${RUN_NAME:-run}"
RUN_DIR="${RUN_DIR:-$HOME/mars_jax-runs/$RUN_NAME}"
REQUIRE_TPU="${REQUIRE_TPU:-1}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-600}"
LINES="${LINES:-20}"
PIDFILE="$RUN_DIR/pid"

die() { echo "tpu_worker.sh [$(hostname)]: $*" >&2; exit 1; }
say() { echo "tpu_worker.sh [worker $WORKER_ID]: $*"; }

worker_id() {
  # The TPU metadata server numbers the workers 0..N-1; anything else: the host name.
  local id
  id="$(curl -s -m 2 -H 'Metadata-Flavor: Google' \
        http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
        2>/dev/null || true)"
  if [[ "$id" =~ ^[0-9]+$ ]]; then echo "$id"; else hostname; fi
}

running_pid() {
  # The pid of this worker's run when it is alive, else nothing.
  local pid
  [[ -f "$PIDFILE" ]] || return 0
  pid="$(cat "$PIDFILE")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

tpu_device_files() {
  # v4 and older: /dev/accelN; v5e, v5p, v6e: /dev/vfio/N. (TPU_DEV_DIR: tests.)
  local dev="${TPU_DEV_DIR:-/dev}"
  compgen -G "$dev/accel*" || compgen -G "$dev/vfio/[0-9]*" || true
}

find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  if [[ -x "$HOME/.local/bin/uv" ]]; then echo "$HOME/.local/bin/uv"; return; fi
  echo "tpu_worker.sh: installing uv (pip install --user uv)" >&2
  python3 -m pip install -q --user uv >&2 \
    || python3 -m pip install -q --user --break-system-packages uv >&2 \
    || (curl -LsSf https://astral.sh/uv/install.sh | sh >&2) \
    || die "could not install uv; set PYTHON=/path/to/python3.11+ instead"
  [[ -x "$HOME/.local/bin/uv" ]] || die "uv not found in $HOME/.local/bin after installing it"
  echo "$HOME/.local/bin/uv"
}

min_python() {
  # setup.cfg's `python_requires = >=3.11` -> 3.11
  sed -n 's/^python_requires *= *>= *\([0-9][0-9.]*\).*/\1/p' "$CHECKOUT/setup.cfg"
}

check_env() {
  # The interpreter is new enough, libtpu is installed, jax imports (no device is touched).
  "$VENV/bin/python" - "$(min_python)" "$REQUIRE_TPU" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

need = tuple(int(x) for x in sys.argv[1].split('.'))
if sys.version_info[:len(need)] < need:
  sys.exit(f'Python {sys.version.split()[0]} in the venv is older than setup.cfg python_requires '
           f'>={sys.argv[1]}; set PYTHON_VERSION (uv) or PYTHON.')
if sys.argv[2] == '1' and importlib.util.find_spec('libtpu') is None:
  sys.exit('libtpu is not installed in the venv, so jax would run on CPU: '
           'install jax[tpu] (JAX_SPEC).')
import jax  # noqa: E402
try:
  libtpu = md.version('libtpu')
except md.PackageNotFoundError:
  libtpu = 'none'
print(f'Python {sys.version.split()[0]}, jax {jax.__version__}, libtpu {libtpu}')
EOF
}

cmd_setup() {
  local src
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local f pid
  for f in "$(dirname "$RUN_DIR")"/*/pid; do   # any run on this worker, whatever its RUN_NAME
    pid="$(cat "$f" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      die "a run is going on this worker (pid $pid, $(dirname "$f")); stop it first" \
          "(launch/tpu_pod.sh stop with its RUN_NAME)"
    fi
  done
  if [[ "$src" != "$CHECKOUT" ]]; then
    rm -rf "$CHECKOUT"
    mv "$src" "$CHECKOUT"
  fi
  cd "$CHECKOUT"
  if [[ "$REQUIRE_TPU" == 1 && -z "$(tpu_device_files)" ]]; then
    die "no TPU device files (/dev/accel*, /dev/vfio/N) on this VM; is it a TPU VM?"
  fi
  if [[ -n "${PYTHON:-}" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -e '.[gcs]' "$JAX_SPEC"
  else
    local uv want
    uv="$(find_uv)"
    want="$PYTHON_VERSION"
    if ! "$VENV/bin/python" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$want')" \
         2>/dev/null; then
      rm -rf "$VENV"
      "$uv" venv -q --python "$want" "$VENV"
    fi
    "$uv" pip install -q --python "$VENV/bin/python" -e '.[gcs]' "$JAX_SPEC"
  fi
  local info
  info="$(check_env)" || die "the environment in $VENV is not usable (above)"
  say "$info"
}

cmd_start() {
  local pid log held
  mkdir -p "$RUN_DIR"
  pid="$(running_pid)"
  [[ -z "$pid" ]] || die "already running (pid $pid); launch/tpu_pod.sh stop first"
  [[ -x "$VENV/bin/python" ]] || die "no $VENV; run setup first (launch/tpu_pod.sh does)"
  if [[ "$REQUIRE_TPU" == 1 ]]; then
    export JAX_PLATFORMS=tpu
    if command -v lsof >/dev/null 2>&1; then
      # shellcheck disable=SC2046  # one word per device file
      held="$(lsof -t $(tpu_device_files) 2>/dev/null | sort -u | tr '\n' ' ' || true)"
      [[ -z "$held" ]] || die "the TPU is held by pid(s) $held (a stale run?); kill them first"
    fi
    # A killed run leaves libtpu's lock behind and the next one would refuse to start.
    rm -f "${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}" 2>/dev/null || true
  fi
  log="$RUN_DIR/worker-$WORKER_ID.log"
  cd "$CHECKOUT"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) start on $(hostname): $*" >>"$log"
  setsid nohup "$VENV/bin/python" -m mars_jax.main "$@" >>"$log" 2>&1 </dev/null &
  echo "$!" >"$PIDFILE"
  say "started pid $!, log $log"
}

cmd_follow() {
  tail -n "$LINES" -F "$RUN_DIR/worker-$WORKER_ID.log" 2>/dev/null \
    | sed -u "s/^/[worker $WORKER_ID] /"
}

cmd_status() {
  local log="$RUN_DIR/worker-$WORKER_ID.log" pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then say "running (pid $pid)"; else say "not running"; fi
  if [[ -f "$log" ]]; then tail -n "$LINES" "$log" | sed "s/^/[worker $WORKER_ID] /"; fi
}

cmd_stop() {
  local pid waited=0
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then say "not running"; return 0; fi
  say "SIGTERM to pid $pid (saves, then exits 143); waiting up to ${STOP_TIMEOUT_S}s"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && ((waited < STOP_TIMEOUT_S)); do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "still running after ${STOP_TIMEOUT_S}s; SIGKILL to its process group"
  fi
  # The process group also holds the data loader's worker processes.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  say "stopped"
}

action="${1:-}"
shift || true
[[ "$action" == -h || "$action" == --help ]] || WORKER_ID="${WORKER_ID:-$(worker_id)}"
case "$action" in
  setup) cmd_setup ;;
  start) cmd_start "$@" ;;
  follow) cmd_follow ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  -h|--help) sed -n '2,37p' "$0" ;;
  *) echo "usage: launch/tpu_worker.sh setup|start|follow|status|stop [MAIN_FLAGS...]" >&2; exit 2 ;;
esac
