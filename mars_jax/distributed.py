"""Joins this process to a multi-process JAX run (TPU pod, SLURM job, or N local processes).

Call `maybe_initialize()` once, before anything touches a JAX device: the device list, the mesh
and `jax.process_index()` all change once the processes are joined. A single-process run is left
alone, so the same command works on a laptop and on a pod.

Where the settings come from, first match wins:
  1. explicit arguments (the CLI's --coordinator/--num_processes/--process_id flags);
  2. MARS_COORDINATOR, MARS_NUM_PROCESSES, MARS_PROCESS_ID (launch/local.sh, launch/gpu_slurm.sh);
  3. a SLURM step with SLURM_NTASKS > 1: jax reads SLURM_* itself;
  4. a Cloud TPU VM (libtpu installed and TPU devices or TPU_WORKER_HOSTNAMES present): jax asks
     the TPU metadata server, so `jax.distributed.initialize()` takes no arguments.
MARS_DISTRIBUTED=0 turns auto-detection (3, 4) off; MARS_DISTRIBUTED=1 forces an argument-less
initialize (jax's own cluster detection). MARS_HEARTBEAT_S (default 100, jax's default) is how
long the survivors wait before a dead peer fails the job instead of hanging it.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax

_ENV = ('MARS_COORDINATOR', 'MARS_NUM_PROCESSES', 'MARS_PROCESS_ID')


def _int_env(name):
  v = os.environ.get(name, '').strip()
  return int(v) if v else None


def _on_tpu_vm() -> bool:
  """Cheap, device-free guess that this is a Cloud TPU VM (jax does the real detection)."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  if os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES'):
    return True
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _slurm_multi(env) -> bool:
  n = int((env.get('SLURM_NTASKS') or env.get('SLURM_NPROCS') or '0').strip() or 0)
  return n > 1 and 'SLURM_PROCID' in env


def plan(coordinator=None, num_processes=None, process_id=None, environ=None) -> dict | None:
  """What `maybe_initialize` would pass to jax.distributed.initialize (None: single process).

  Pure (reads only `environ`), so tests check every launch path without starting anything.
  """
  env = os.environ if environ is None else environ
  get = lambda k: (env.get(k) or '').strip() or None
  coordinator = coordinator or get('MARS_COORDINATOR')
  num_processes = num_processes if num_processes is not None else get('MARS_NUM_PROCESSES')
  process_id = process_id if process_id is not None else get('MARS_PROCESS_ID')
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given):
    if not all(given):
      missing = [n for n, g in zip(('coordinator', 'num_processes', 'process_id'), given) if not g]
      raise ValueError(f'multi-process run: also set {missing} (flags --coordinator/--num_processes'
                       f'/--process_id or env {", ".join(_ENV)}).')
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes == 1:
      return None
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id={process_id} not in [0, {num_processes}).')
    return {'coordinator_address': coordinator, 'num_processes': num_processes,
            'process_id': process_id}
  mode = get('MARS_DISTRIBUTED')
  if mode == '0':
    return None
  if mode == '1':
    return {}
  if _slurm_multi(env) or (environ is None and _on_tpu_vm()):
    return {}   # jax.distributed.initialize() reads SLURM_* / the TPU metadata itself
  return None


def maybe_initialize(coordinator=None, num_processes=None, process_id=None) -> tuple:
  """Initializes jax.distributed when this is a multi-process run; idempotent.

  Returns (process_index, process_count).
  """
  if not jax.distributed.is_initialized():
    kwargs = plan(coordinator, num_processes, process_id)
    if kwargs is not None:
      # CPU devices exchange data over gloo; without it cross-process CPU collectives fail.
      # Harmless on GPU/TPU, where the accelerator's own collectives are used.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      heartbeat = _int_env('MARS_HEARTBEAT_S')
      if heartbeat:
        kwargs['heartbeat_timeout_seconds'] = heartbeat
      jax.distributed.initialize(**kwargs)
  return jax.process_index(), jax.process_count()


def is_main() -> bool:
  """True on process 0: the one that writes logs, reports and other single-copy files."""
  return jax.process_index() == 0
