"""launch/*.sh: valid bash, shellcheck-clean, their dry runs, and real runs against fake tools.

The dry runs print the right mars_jax.main call. The real runs put a fake `gcloud` (two TPU
workers, each a folder with its own HOME) and fake `srun`/`scontrol` on PATH, small shell scripts
written here that record every call, and run tpu_pod.sh and gpu_slurm.sh non-dry up to the
training command, which is a fake interpreter that records its flags and environment and waits
for SIGTERM like the engine (save, exit 143). Also checks that the environment each script sets
is what `mars_jax.distributed` reads, so a launch path and the process-joining code cannot drift
apart, and that setup.cfg's python_requires is what the dependencies need.
"""
import configparser
import importlib.metadata
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from mars_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('tpu_pod.sh', 'tpu_worker.sh', 'gpu_slurm.sh', 'local.sh')
ENTRY_SCRIPTS = ('tpu_pod.sh', 'gpu_slurm.sh', 'local.sh')


def _script(name):
  return os.path.join(ROOT, 'launch', name)


_NOT_INHERITED = ('SLURM_', 'MARS_', 'PROJECT', 'ZONE', 'BUCKET', 'XLA_FLAGS', 'JAX_', 'LIBTPU_',
                  'TPU_', 'NCCL_', 'CUDA_VISIBLE_DEVICES', 'GPUS', 'RUN_NAME', 'WORKDIR', 'PORT')


def _clean_env(**env):
  full = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
  full.update(env)
  return full


def _dry(name, *args, **env):
  full = _clean_env(**env)
  full['DRY_RUN'] = '1'
  return subprocess.run(['bash', _script(name), *args], env=full, capture_output=True,
                        text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize('name', SCRIPTS)
def test_bash_syntax(name):
  r = subprocess.run(['bash', '-n', _script(name)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('name', SCRIPTS)
def test_shellcheck(name):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck not installed (apt-get install -y shellcheck); bash -n still ran')
  r = subprocess.run(['shellcheck', _script(name)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize('name', ENTRY_SCRIPTS)
def test_usage_header_and_strict_mode(name):
  with open(_script(name)) as f:
    text = f.read()
  assert 'set -euo pipefail' in text
  assert '# Usage:' in text and 'DRY_RUN' in text


def test_local_dry_run_starts_n_processes():
  r = _dry('local.sh', '-n', '3', '--config=configs/tiny.py', '--workdir=/tmp/w',
           '--stages=prepare,tokenizer', CPU_DEVICES='4', PORT='23456')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert 'MARS_COORDINATOR=127.0.0.1:23456 MARS_NUM_PROCESSES=3' in line
    assert f'MARS_PROCESS_ID={i} ' in line
    assert 'XLA_FLAGS=--xla_force_host_platform_device_count=4' in line
    assert line.endswith('python -m mars_jax.main --config=configs/tiny.py --workdir=/tmp/w '
                         '--stages=prepare,tokenizer')
  # `--dry-run` is the same as DRY_RUN=1.
  r2 = subprocess.run(['bash', _script('local.sh'), '--dry-run', '-n', '1'], capture_output=True,
                      text=True, cwd=ROOT)
  assert r2.returncode == 0 and r2.stdout.count('mars_jax.main') == 1


def test_local_rejects_bad_count():
  r = _dry('local.sh', '-n', 'two')
  assert r.returncode == 2 and 'positive integer' in r.stderr


@pytest.mark.parametrize('nodelist,host', [('gpu[017-020]', 'gpu017'), ('a1,a2', 'a1'),
                                           ('n[3,5-7],m1', 'n3'), ('solo', 'solo')])
def test_slurm_dry_run(nodelist, host):
  r = _dry('gpu_slurm.sh', '--stages=tokenizer', SLURM_JOB_NODELIST=nodelist, SLURM_NTASKS='32',
           SLURM_JOB_ID='77', PORT='4321', PATH='/usr/bin:/bin')   # no scontrol: the fallback
  assert r.returncode == 0, r.stderr
  assert f'MARS_COORDINATOR={host}:4321 MARS_NUM_PROCESSES=32' in r.stdout
  assert 'srun --kill-on-bad-exit=1 --ntasks=32' in r.stdout
  assert 'MARS_PROCESS_ID="$SLURM_PROCID"' in r.stdout
  assert 'JAX_PLATFORMS=cuda' in r.stdout
  assert 'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true' in r.stdout
  # A named workdir (not runs/$SLURM_JOB_ID): a requeued or resubmitted job resumes there.
  # Loader workers fit the task's CPUs (8 per task by default: 7 loaders + the task).
  assert (f'python -m mars_jax.main --config=configs/large.py --workdir={ROOT}/runs/mars_jax '
          f'--config.data.loader_workers=7 --stages=tokenizer') in r.stdout


def test_slurm_dry_run_names_and_flags():
  r = _dry('gpu_slurm.sh', '--workdir=/shared/x', SLURM_JOB_NODELIST='a1', SLURM_NTASKS='2',
           SLURM_CPUS_PER_TASK='4', SLURM_JOB_NAME='exp3', PORT='1', PATH='/usr/bin:/bin')
  assert r.returncode == 0, r.stderr
  assert '--workdir=/shared/x --config.data.loader_workers=3' in r.stdout
  r = _dry('gpu_slurm.sh', SLURM_JOB_NODELIST='a1', SLURM_NTASKS='2', SLURM_JOB_NAME='exp3',
           SLURM_SUBMIT_DIR='/sub', PORT='1', PATH='/usr/bin:/bin')
  assert '--workdir=/sub/runs/exp3 ' in r.stdout
  r = _dry('gpu_slurm.sh', '--config.data.loader_workers=16', SLURM_CPUS_PER_TASK='8', PORT='1',
           PATH='/usr/bin:/bin')
  assert r.returncode == 2 and 'loader_workers=16' in r.stderr and 'at most 7' in r.stderr
  # Without PORT, a free port is picked (not a fixed one).
  r = _dry('gpu_slurm.sh', SLURM_JOB_NODELIST='a1', PATH='/usr/bin:/bin')
  port = int(re.search(r'MARS_COORDINATOR=a1:(\d+)', r.stdout).group(1))
  assert 0 < port < 65536 and port != 12355


def test_slurm_header_requeues_on_signal():
  with open(_script('gpu_slurm.sh')) as f:
    text = f.read()
  assert '#SBATCH --signal=B:TERM@120' in text and '#SBATCH --requeue' in text
  assert '#SBATCH --open-mode=append' in text


def test_tpu_dry_run():
  r = _dry('tpu_pod.sh', '--config.autoregressor.train.steps=10', PROJECT='proj', ZONE='us-east5-a',
           BUCKET='bkt', ACCELERATOR_TYPE='v5p-128', TPU_NAME='t1')
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert ('gcloud compute tpus tpu-vm create t1 --project=proj --zone=us-east5-a '
          '--accelerator-type=v5p-128 --version=v2-alpha-tpuv5') in out
  assert 'tpu-vm scp' in out and 'launch/tpu_worker.sh setup' in out
  assert "'JAX_SPEC=jax[tpu]==0.10.2'" in out    # pinned, installed with the checkout
  assert 'pip install -U' not in out
  assert out.count('--worker=all') == 3
  assert ('bash launch/tpu_worker.sh start --config=configs/large.py '
          '--workdir=gs://bkt/mars_jax/large --config.data.path=gs://bkt/nsynth '
          '--config.autoregressor.train.steps=10') in out


@pytest.mark.parametrize('accel,runtime', [('v5p-64', 'v2-alpha-tpuv5'),
                                           ('v6e-256', 'v2-alpha-tpuv6e'),
                                           ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                           ('v4-32', 'tpu-ubuntu2204-base')])
def test_tpu_runtime_per_accelerator(accel, runtime):
  r = _dry('tpu_pod.sh', PROJECT='p', ZONE='z', BUCKET='b', ACCELERATOR_TYPE=accel)
  assert r.returncode == 0, r.stderr
  assert f'--accelerator-type={accel} --version={runtime}' in r.stdout
  assert f'{accel} uses runtime {runtime}' in r.stdout
  r = _dry('tpu_pod.sh', PROJECT='p', ZONE='z', BUCKET='b', ACCELERATOR_TYPE='tpu7x-64')
  assert r.returncode == 2 and 'set RUNTIME_VERSION' in r.stderr


def test_tpu_dry_run_queued_spot_autocheckpoint_and_commands():
  r = _dry('tpu_pod.sh', PROJECT='p', ZONE='z', BUCKET='b', TPU_NAME='t', QUEUED='1', SPOT='1',
           AUTOCHECKPOINT='1', ACCELERATOR_TYPE='v5litepod-16')
  assert r.returncode == 0, r.stderr
  assert ('gcloud alpha compute tpus queued-resources create t --node-id=t --project=p --zone=z '
          '--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot '
          '--autocheckpoint-enabled') in r.stdout
  for action in ('follow', 'status', 'stop'):
    r = _dry('tpu_pod.sh', action, PROJECT='p', ZONE='z', TPU_NAME='t', RUN_NAME='r1')
    assert r.returncode == 0, r.stderr   # no BUCKET needed
    assert r.stdout.strip() == (
        "gcloud compute tpus tpu-vm ssh t --project=p --zone=z --worker=all '--command=cd mars_jax "
        f"&& env RUN_NAME=r1 STOP_TIMEOUT_S=600 bash launch/tpu_worker.sh {action}'")
  r = _dry('tpu_pod.sh', 'delete', PROJECT='p', ZONE='z', TPU_NAME='t', QUEUED='1')
  assert r.stdout.strip() == ('gcloud compute tpus queued-resources delete t --project=p --zone=z '
                              '--force --quiet')


def test_tpu_requires_project():
  r = _dry('tpu_pod.sh', ZONE='z', BUCKET='b')
  assert r.returncode != 0 and 'PROJECT' in r.stderr


def test_distributed_plan_reads_what_the_scripts_set():
  env = {'MARS_COORDINATOR': '127.0.0.1:1234', 'MARS_NUM_PROCESSES': '2', 'MARS_PROCESS_ID': '1'}
  assert distributed.plan(environ=env) == {'coordinator_address': '127.0.0.1:1234',
                                           'num_processes': 2, 'process_id': 1}
  # Flags win over the environment; one process means no initialize at all.
  assert distributed.plan('h:9', 4, 3, environ=env)['process_id'] == 3
  single = {**env, 'MARS_NUM_PROCESSES': '1', 'MARS_PROCESS_ID': '0'}
  assert distributed.plan(environ=single) is None
  assert distributed.plan(environ={}) is None
  # SLURM with several tasks: jax's own detection (no arguments); one task: single process.
  assert distributed.plan(environ={'SLURM_NTASKS': '8', 'SLURM_PROCID': '3'}) == {}
  assert distributed.plan(environ={'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}) is None
  assert distributed.plan(environ={'SLURM_NTASKS': '8', 'SLURM_PROCID': '3',
                                   'MARS_DISTRIBUTED': '0'}) is None
  assert distributed.plan(environ={'MARS_DISTRIBUTED': '1'}) == {}
  with pytest.raises(ValueError, match='num_processes'):
    distributed.plan(coordinator='h:1', environ={})
  with pytest.raises(ValueError, match='not in'):
    distributed.plan('h:1', 2, 2, environ={})


def test_maybe_initialize_single_process_is_a_no_op():
  assert distributed.maybe_initialize() == (0, 1)
  assert distributed.maybe_initialize() == (0, 1)   # idempotent
  assert distributed.is_main()


# --- real runs against fake tools ---------------------------------------------------------------


def _write_exe(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return str(path)


def _calls(path):
  """Recorded calls: one per line, arguments separated by \\x1f."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [line.rstrip('\n').split('\x1f')[:-1] for line in f if line.strip()]


def _wait_for(pred, timeout=20.0, what=''):
  end = time.time() + timeout
  while time.time() < end:
    if pred():
      return
    time.sleep(0.05)
  raise AssertionError(f'timed out waiting for {what}')


_RECORD = r'''printf '%s\x1f' "$@" >> "{log}"; echo >> "{log}"'''


def _fake_tpu(tmp_path, workers=2, libtpu=True):
  """A fake `gcloud` driving `workers` fake TPU VMs (folders) and a fake uv/venv python."""
  root = tmp_path / 'cloud'
  bin_dir = tmp_path / 'bin'
  pkgs = tmp_path / 'pkgs'
  for d in (root, bin_dir, pkgs, root / 'dev' / 'vfio'):
    d.mkdir(parents=True, exist_ok=True)
  (root / 'dev' / 'vfio' / '0').write_text('')           # a TPU VM's device file
  if libtpu:
    (pkgs / 'libtpu').mkdir()
    (pkgs / 'libtpu' / '__init__.py').write_text('')
  # The venv's interpreter: the real one, except that the training command is recorded and then
  # waits for SIGTERM like the engine (saves, exits 143).
  venv_python = _write_exe(bin_dir / 'venv-python', f'''#!/usr/bin/env bash
if [[ "${{1:-}}" == -m && "${{2:-}}" == mars_jax.main ]]; then
  shift 2
  {{ printf 'args:'; printf ' %s' "$@"; echo; echo "cwd=$PWD"
     env | grep -E '^(JAX_PLATFORMS|MARS_[A-Z_]*|XLA_FLAGS|RUN_NAME|LIBTPU_INIT_ARGS)=' | sort
  }} > "$HOME/main.call.tmp"
  mv "$HOME/main.call.tmp" "$HOME/main.call"
  trap 'echo "preempted: saved step 7"; echo saved > "$HOME/main.term"; exit 143' TERM
  echo "step 1 loss 0.5"
  while true; do sleep 0.1; done
fi
PYTHONPATH="{pkgs}" exec "{sys.executable}" "$@"
''')
  _write_exe(bin_dir / 'uv', f'''#!/usr/bin/env bash
{_RECORD.format(log='$HOME/uv.calls')}
if [[ "$1" == venv ]]; then
  dir="${{!#}}"; mkdir -p "$dir/bin"; cp "{venv_python}" "$dir/bin/python"
fi
''')
  _write_exe(bin_dir / 'gcloud', f'''#!/usr/bin/env bash
{_RECORD.format(log=root / 'gcloud.calls')}
args=("$@")
[[ "${{args[0]}}" == alpha ]] && args=("${{args[@]:1}}")
state="{root}/state"
case "${{args[2]}}:${{args[3]}}" in
  tpu-vm:describe) [[ -f "$state" ]] || exit 1; cat "$state" ;;
  queued-resources:describe) [[ -f "$state.qr" ]] || exit 1; cat "$state.qr" ;;
  tpu-vm:create) echo READY > "$state" ;;
  queued-resources:create) echo READY > "$state"; echo ACTIVE > "$state.qr" ;;
  tpu-vm:delete|queued-resources:delete) rm -f "$state" "$state.qr" ;;
  tpu-vm:scp)
    for ((i = 0; i < {workers}; i++)); do
      mkdir -p "{root}/worker$i"; cp "${{args[4]}}" "{root}/worker$i/${{args[5]#*:}}"
    done ;;
  tpu-vm:ssh)
    for a in "${{args[@]}}"; do [[ "$a" == --command=* ]] && cmd="${{a#--command=}}"; done
    pids=()
    for ((i = 0; i < {workers}; i++)); do
      home="{root}/worker$i"; mkdir -p "$home"
      # A worker's environment is its own: nothing of this shell's gets there but the command.
      (cd "$home" && exec env -i HOME="$home" PATH="{bin_dir}:/usr/bin:/bin" WORKER_ID=$i \\
         TPU_DEV_DIR="{root}/dev" LIBTPU_LOCKFILE="$home/libtpu_lockfile" bash -c "$cmd") &
      pids+=($!)
    done
    rc=0
    for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done
    exit $rc ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 3 ;;
esac
''')
  return root, bin_dir


def _tpu_env(tmp_path, bin_dir, **env):
  return _clean_env(PROJECT='proj', ZONE='us-east1-d', BUCKET='bkt', TPU_NAME='t1',
                    ACCELERATOR_TYPE='v6e-8', PATH=f'{bin_dir}:/usr/bin:/bin',
                    TMPDIR=str(tmp_path), POLL_S='0', STOP_TIMEOUT_S='20',
                    PYTHON_VERSION=f'{sys.version_info[0]}.{sys.version_info[1]}', **env)


def _tpu(env, *args, timeout=120):
  return subprocess.run(['bash', _script('tpu_pod.sh'), *args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT)


def _kill_fake_runs(root):
  for pidfile in root.glob('worker*/mars_jax-runs/*/pid'):
    pid = int(pidfile.read_text())
    # The process itself (it may not have become a group leader yet), then its group.
    for kill in (os.kill, os.killpg):
      try:
        kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass


def _verbs(calls):
  out = []
  for c in calls:
    c = c[1:] if c[0] == 'alpha' else c
    out.append(f'{c[2]}:{c[3]}')
  return out


@pytest.mark.slow
def test_tpu_pod_runs_detached_on_every_worker_with_fake_gcloud(tmp_path):
  root, bin_dir = _fake_tpu(tmp_path)
  env = _tpu_env(tmp_path, bin_dir, MARS_HEARTBEAT_S='30', XLA_FLAGS='--xla_a=1 --xla_b=2',
                 MARS_COORDINATOR='127.0.0.1:1', MARS_NUM_PROCESSES='2', MARS_PROCESS_ID='0')
  for i in range(2):   # a stale libtpu lock left by a killed run
    (root / f'worker{i}').mkdir()
    (root / f'worker{i}' / 'libtpu_lockfile').write_text('')
  try:
    r = _tpu(env, '--config.autoregressor.train.steps=10')
    assert r.returncode == 0, r.stdout + r.stderr
    assert _verbs(_calls(root / 'gcloud.calls')) == [   # created, then seen READY
        'tpu-vm:describe', 'tpu-vm:create', 'tpu-vm:describe', 'tpu-vm:scp', 'tpu-vm:ssh',
        'tpu-vm:ssh']
    create = _calls(root / 'gcloud.calls')[1]
    assert '--accelerator-type=v6e-8' in create and '--version=v2-alpha-tpuv6e' in create
    assert 'v6e-8 uses runtime v2-alpha-tpuv6e' in r.stdout
    for i in range(2):
      home = root / f'worker{i}'
      _wait_for(lambda: (home / 'main.call').exists(), what=f'worker {i} to start')
      # The checkout replaced ~/mars_jax, installed into a venv made by uv, pinned jax.
      assert (home / 'mars_jax' / 'setup.cfg').exists()
      assert (home / 'mars_jax' / 'launch' / 'tpu_worker.sh').exists()
      assert not (home / 'mars_jax.new').exists()
      venv = home / 'mars_jax-venv'
      uv = _calls(home / 'uv.calls')
      assert uv[0] == ['venv', '-q', '--python', env['PYTHON_VERSION'], str(venv)]
      assert uv[1] == ['pip', 'install', '-q', '--python', f'{venv}/bin/python', '-e', '.[gcs]',
                       'jax[tpu]==0.10.2']
      assert f'[worker {i}]: Python {sys.version.split()[0]}, jax' in r.stdout
      # Detached with per-worker env and log; local variables forwarded, local.sh's not.
      call = (home / 'main.call').read_text().splitlines()
      assert call[0] == ('args: --config=configs/large.py --workdir=gs://bkt/mars_jax/large '
                         '--config.data.path=gs://bkt/nsynth '
                         '--config.autoregressor.train.steps=10')
      assert call[1] == f'cwd={home}/mars_jax'
      assert 'JAX_PLATFORMS=tpu' in call and 'MARS_HEARTBEAT_S=30' in call
      assert 'XLA_FLAGS=--xla_a=1 --xla_b=2' in call and 'RUN_NAME=large' in call
      assert not any(line.startswith(('MARS_COORDINATOR', 'MARS_NUM_PROCESSES',
                                      'MARS_PROCESS_ID')) for line in call)
      assert not (home / 'libtpu_lockfile').exists()
      log = home / 'mars_jax-runs' / 'large' / f'worker-{i}.log'
      _wait_for(lambda: 'step 1 loss' in log.read_text(), what='the log')
      pid = int((home / 'mars_jax-runs' / 'large' / 'pid').read_text())
      assert os.getpgid(pid) == pid    # its own session and process group (setsid)
    assert 'follow: launch/tpu_pod.sh follow' in r.stdout

    r = _tpu(env, 'status')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('running (pid') == 2 and '[worker 1] step 1 loss 0.5' in r.stdout

    # follow streams every worker's log, prefixed; stopping it leaves the run alone.
    p = subprocess.Popen(['bash', _script('tpu_pod.sh'), 'follow'], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    seen = set()
    try:
      end = time.time() + 20
      while len(seen) < 2 and time.time() < end:
        line = p.stdout.readline()
        m = re.match(r'\[worker (\d)\] step 1 loss', line)
        if m:
          seen.add(m.group(1))
    finally:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
    assert seen == {'0', '1'}

    # A second `up` while the run goes refuses instead of starting another one.
    r = _tpu(env)
    assert r.returncode != 0 and 'a run is going on this worker' in r.stderr

    r = _tpu(env, 'stop')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('stopped') == 2
    for i in range(2):
      home = root / f'worker{i}'
      assert (home / 'main.term').read_text() == 'saved\n'     # SIGTERM reached the run
      assert 'preempted: saved step 7' in (
          home / 'mars_jax-runs' / 'large' / f'worker-{i}.log').read_text()
    r = _tpu(env, 'status')
    assert r.stdout.count('not running') == 2

    # A preempted Spot slice is deleted and created again; the venv is reused.
    (root / 'state').write_text('PREEMPTED\n')
    for i in range(2):
      (root / f'worker{i}' / 'main.call').unlink()
    r = _tpu({**env, 'SPOT': '1'})
    assert r.returncode == 0, r.stdout + r.stderr
    verbs = _verbs(_calls(root / 'gcloud.calls'))
    assert verbs[-7:] == ['tpu-vm:describe', 'tpu-vm:delete', 'tpu-vm:create', 'tpu-vm:describe',
                          'tpu-vm:scp', 'tpu-vm:ssh', 'tpu-vm:ssh']
    assert '--spot' in _calls(root / 'gcloud.calls')[-5]
    assert 'PREEMPTED' in r.stdout and 'creating it again' in r.stdout
    for i in range(2):
      home = root / f'worker{i}'
      _wait_for(lambda: (home / 'main.call').exists(), what='the restart')
      assert [c[0] for c in _calls(home / 'uv.calls')] == ['venv', 'pip', 'pip']
    r = _tpu(env, 'stop')
    assert r.returncode == 0 and r.stdout.count('stopped') == 2
  finally:
    _kill_fake_runs(root)


def test_tpu_pod_recreates_a_suspended_queued_resource(tmp_path):
  root, bin_dir = _fake_tpu(tmp_path, workers=1)
  (root / 'state.qr').write_text('SUSPENDED\n')     # a preempted Spot queued resource, no node
  env = _tpu_env(tmp_path, bin_dir, QUEUED='1', SPOT='1')
  try:
    r = _tpu(env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _verbs(_calls(root / 'gcloud.calls')) == [
        'tpu-vm:describe', 'queued-resources:describe', 'queued-resources:delete',
        'queued-resources:create', 'tpu-vm:describe', 'tpu-vm:scp', 'tpu-vm:ssh', 'tpu-vm:ssh']
    create = _calls(root / 'gcloud.calls')[3]
    assert '--node-id=t1' in create and '--spot' in create
    assert '--runtime-version=v2-alpha-tpuv6e' in create
    _wait_for(lambda: (root / 'worker0' / 'main.call').exists(), what='the start')
    assert _tpu(env, 'stop').stdout.count('stopped') == 1
  finally:
    _kill_fake_runs(root)


def test_tpu_worker_without_libtpu_never_starts(tmp_path):
  root, bin_dir = _fake_tpu(tmp_path, workers=1, libtpu=False)
  try:
    r = _tpu(_tpu_env(tmp_path, bin_dir))
    assert r.returncode != 0
    assert 'libtpu is not installed in the venv, so jax would run on CPU' in r.stderr
    assert _verbs(_calls(root / 'gcloud.calls'))[-1] == 'tpu-vm:ssh'   # setup, no start
    assert not (root / 'worker0' / 'main.call').exists()
  finally:
    _kill_fake_runs(root)


def _fake_slurm(tmp_path):
  root = tmp_path / 'slurm'
  bin_dir = tmp_path / 'sbin'
  root.mkdir()
  bin_dir.mkdir()
  _write_exe(bin_dir / 'srun', f'''#!/usr/bin/env bash
{_RECORD.format(log=root / 'srun.calls')}
n=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && n="${{1#--ntasks=}}"; shift; done
pids=()
trap 'kill -TERM "${{pids[@]}}" 2>/dev/null' TERM    # srun passes SIGTERM to every task
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${{pids[@]}}"; do
  while true; do wait "$p"; r=$?; kill -0 "$p" 2>/dev/null || break; done
  ((r > rc)) && rc=$r
done
exit $rc
''')
  _write_exe(bin_dir / 'scontrol', f'''#!/usr/bin/env bash
{_RECORD.format(log=root / 'scontrol.calls')}
if [[ "$1 $2" == "show hostnames" ]]; then echo gpu017; echo gpu018; fi
''')
  python = _write_exe(bin_dir / 'python', f'''#!/usr/bin/env bash
if [[ "${{1:-}}" == -m && "${{2:-}}" == mars_jax.main ]]; then
  shift 2
  f="{root}/task-$MARS_PROCESS_ID"
  {{ printf 'args:'; printf ' %s' "$@"; echo
     env | grep -E '^(MARS_[A-Z_]*|JAX_PLATFORMS|XLA_FLAGS|NCCL_DEBUG|SLURM_PROCID)=' |
       sort; }} > "$f.call"
  case "${{FAKE_MODE:-ok}}" in
    ok) exit 0 ;;
    preempt) exit 143 ;;
    wait) trap 'echo saved > "$f.term"; exit 143' TERM; touch "$f.started"
          while true; do sleep 0.1; done ;;
  esac
fi
if [[ "${{1:-}}" == - ]]; then cat >/dev/null; exit "${{FAKE_CUDA_RC:-0}}"; fi
exec "{sys.executable}" "$@"
''')
  env = _clean_env(PATH=f'{bin_dir}:/usr/bin:/bin', PYTHON=python, SLURM_JOB_ID='77',
                   SLURM_JOB_NODELIST='gpu[017-018]', SLURM_NTASKS='4', SLURM_CPUS_PER_TASK='4',
                   SLURM_JOB_NAME='exp', SLURM_SUBMIT_DIR=str(tmp_path))
  return root, env


def _slurm(env, *args):
  return subprocess.run(['bash', _script('gpu_slurm.sh'), *args], env=env, capture_output=True,
                        text=True, timeout=60, cwd=ROOT)


def test_gpu_slurm_runs_every_task_with_fake_srun(tmp_path):
  root, env = _fake_slurm(tmp_path)
  r = _slurm(env, '--stages=tokenizer')
  assert r.returncode == 0, r.stdout + r.stderr
  port = None
  for i in range(4):
    call = (root / f'task-{i}.call').read_text().splitlines()
    assert call[0] == (f'args: --config=configs/large.py --workdir={tmp_path}/runs/exp '
                       '--config.data.loader_workers=3 --stages=tokenizer')
    assert f'MARS_PROCESS_ID={i}' in call and 'MARS_NUM_PROCESSES=4' in call
    coord = [line for line in call if line.startswith('MARS_COORDINATOR=')][0]
    m = re.fullmatch(r'MARS_COORDINATOR=gpu017:(\d+)', coord)
    assert m, coord
    port = port or m.group(1)
    assert m.group(1) == port   # one coordinator for all
    assert 'JAX_PLATFORMS=cuda' in call and 'NCCL_DEBUG=WARN' in call
    assert 'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true' in call
  assert (tmp_path / 'runs' / 'exp').is_dir()
  assert _calls(root / 'srun.calls')[0][:2] == ['--kill-on-bad-exit=1', '--ntasks=4']
  assert ['requeue', '77'] not in _calls(root / 'scontrol.calls')


def test_gpu_slurm_requeues_after_a_save_on_sigterm(tmp_path):
  root, env = _fake_slurm(tmp_path)
  # Tasks that saved and exited 143 (e.g. preempted by SLURM): requeue, same job, same workdir.
  r = _slurm({**env, 'FAKE_MODE': 'preempt'})
  assert r.returncode == 143
  assert ['requeue', '77'] in _calls(root / 'scontrol.calls')
  assert 'resumes from' in r.stderr

  # The time limit: SIGTERM to the batch shell only (--signal=B:TERM@120); it reaches every task.
  (root / 'scontrol.calls').unlink()
  p = subprocess.Popen(['bash', _script('gpu_slurm.sh')], env={**env, 'FAKE_MODE': 'wait'},
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: all((root / f'task-{i}.started').exists() for i in range(4)),
              what='the tasks to start')
    os.kill(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=30)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 143, err
  assert all((root / f'task-{i}.term').read_text() == 'saved\n' for i in range(4))
  assert ['requeue', '77'] in _calls(root / 'scontrol.calls')


def test_gpu_slurm_refuses_cpu_only_jax(tmp_path):
  root, env = _fake_slurm(tmp_path)
  r = _slurm({**env, 'FAKE_CUDA_RC': '1'})
  assert r.returncode == 2 and 'has no CUDA plugin' in r.stderr
  assert not (root / 'srun.calls').exists()


def test_local_gives_each_process_its_own_gpus(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'nvidia-smi', '#!/bin/sh\nprintf "0\\n1\\n2\\n3\\n"\n')
  env = _clean_env(PATH=f'{bin_dir}:/usr/bin:/bin', DRY_RUN='1')
  run = lambda *a, **e: subprocess.run(['bash', _script('local.sh'), *a], env={**env, **e},
                                       capture_output=True, text=True, cwd=ROOT)
  r = run('-n', '2', '--x')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert 'CUDA_VISIBLE_DEVICES=0,1 ' in lines[0] and 'CUDA_VISIBLE_DEVICES=2,3 ' in lines[1]
  r = run('-n', '4', '--x', CUDA_VISIBLE_DEVICES='4,5,6,7')
  assert [re.search(r'CUDA_VISIBLE_DEVICES=(\S+)', x).group(1) for x in r.stdout.splitlines()] == [
      '4', '5', '6', '7']
  r = run('-n', '3', '--x')
  assert r.returncode == 2 and 'cannot split the 4 GPUs' in r.stderr
  r = run('-n', '2', '--x', CPU_DEVICES='2')      # simulated CPUs: GPUs untouched
  assert 'CUDA_VISIBLE_DEVICES' not in r.stdout


def _requires_python(dist):
  spec = importlib.metadata.metadata(dist).get('Requires-Python') or ''
  m = re.search(r'>=\s*(\d+)\.(\d+)', spec)
  return (int(m.group(1)), int(m.group(2))) if m else (3, 0)


def test_python_requires_is_what_the_dependencies_need():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, 'setup.cfg'))
  m = re.fullmatch(r'>=\s*(\d+)\.(\d+)', cfg['options']['python_requires'].strip())
  stated = (int(m.group(1)), int(m.group(2)))
  need = {d: _requires_python(d) for d in ('jax', 'jaxlib', 'flax', 'orbax-checkpoint', 'grain')}
  assert stated >= max(need.values()), (stated, need)
  assert sys.version_info[:2] >= stated
  # The TPU workers' interpreter meets it (tpu_pod.sh and tpu_worker.sh default PYTHON_VERSION).
  for name in ('tpu_pod.sh', 'tpu_worker.sh'):
    with open(_script(name)) as f:
      v = re.search(r'PYTHON_VERSION="\$\{PYTHON_VERSION:-(\d+)\.(\d+)\}"', f.read())
    assert (int(v.group(1)), int(v.group(2))) >= stated, name
