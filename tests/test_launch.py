"""launch/*.sh: valid bash, shellcheck-clean, and their dry runs print the right mars_jax.main call.

Also checks that the environment each script sets is what `mars_jax.distributed` reads, so a
launch path and the process-joining code cannot drift apart.
"""
import os
import shutil
import subprocess

import pytest

from mars_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('tpu_pod.sh', 'gpu_slurm.sh', 'local.sh')


def _script(name):
  return os.path.join(ROOT, 'launch', name)


def _dry(name, *args, **env):
  full = {k: v for k, v in os.environ.items()
          if not k.startswith(('SLURM_', 'MARS_', 'PROJECT', 'ZONE', 'BUCKET'))}
  full.update(env)
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


@pytest.mark.parametrize('name', SCRIPTS)
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
  assert (f'python -m mars_jax.main --config=configs/large.py --workdir={ROOT}/runs/77 '
          f'--stages=tokenizer') in r.stdout


def test_tpu_dry_run():
  r = _dry('tpu_pod.sh', '--config.autoregressor.train.steps=10', PROJECT='proj', ZONE='us-east5-a',
           BUCKET='bkt', ACCELERATOR_TYPE='v5p-128', TPU_NAME='t1')
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert ('gcloud compute tpus tpu-vm create t1 --project=proj --zone=us-east5-a '
          '--accelerator-type=v5p-128 --version=v2-alpha-tpuv5') in out
  assert 'tpu-vm scp' in out and 'pip install -q -e' in out and '.[gcs]' in out
  assert out.count('--worker=all') == 3
  assert ('python3 -m mars_jax.main --config=configs/large.py --workdir=gs://bkt/mars_jax/large '
          '--config.data.path=gs://bkt/nsynth --config.autoregressor.train.steps=10') in out


def test_tpu_requires_project():
  r = _dry('tpu_pod.sh', ZONE='z', BUCKET='b')
  assert r.returncode != 0 and 'PROJECT' in r.stderr


def test_distributed_plan_reads_what_the_scripts_set():
  env = {'MARS_COORDINATOR': '127.0.0.1:1234', 'MARS_NUM_PROCESSES': '2', 'MARS_PROCESS_ID': '1'}
  assert distributed.plan(environ=env) == {'coordinator_address': '127.0.0.1:1234',
                                           'num_processes': 2, 'process_id': 1}
  # Flags win over the environment; one process means no initialize at all.
  assert distributed.plan('h:9', 4, 3, environ=env)['process_id'] == 3
  assert distributed.plan(environ={**env, 'MARS_NUM_PROCESSES': '1', 'MARS_PROCESS_ID': '0'}) is None
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
