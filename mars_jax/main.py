"""CLI: flags -> validated config -> stages, in order, each resumable.

  python -m mars_jax.main --config=configs/tiny.py --workdir=/tmp/mars \
      [--stages=prepare,tokenizer] [--config.tokenizer.train.steps=100]
"""
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mars_jax import allocator
from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax import stages as stages_lib
from mars_jax import workdir as workdir_lib

STAGES = stages_lib.STAGES
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py')

def check_argv(argv):
  """The --config file and every --config.KEY override, checked before absl parses them (which
  would end in a raw traceback): returns an error message naming the fix, or None."""
  import difflib
  import importlib.util
  cfg_arg, keys = None, []
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == '--':
      break
    if a.startswith('--config='):
      cfg_arg = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(args):
      cfg_arg = args[i + 1]
    elif a.startswith(('--config.', '--noconfig.')):
      keys.append(a.split('config.', 1)[1].split('=', 1)[0])
  path, _, variant = (cfg_arg or DEFAULT_CONFIG).partition(':')
  if not os.path.isfile(path):
    here = sorted(f for f in os.listdir(os.path.dirname(DEFAULT_CONFIG)) if f.endswith('.py'))
    return (f'--config={cfg_arg}: no such file ({os.path.abspath(path)}). The project\'s configs '
            f'are in {os.path.dirname(DEFAULT_CONFIG)}: {", ".join(here)}.')
  if not keys:
    return None
  try:
    spec = importlib.util.spec_from_file_location('mars_jax_check_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except Exception:  # noqa: BLE001 - a broken config file: absl reports it in full
    return None

  def flat(node, prefix=''):
    out = []
    for k, v in node.items():
      out.append(prefix + k)
      if hasattr(v, 'items'):
        out += flat(v, prefix + k + '.')
    return out

  every = flat(config)
  for key in keys:
    node, walked = config, []
    for part in key.split('.'):
      if not hasattr(node, 'items') or part not in node:
        here = [walked and '.'.join(walked) + '.' + k or k
                for k in (node.keys() if hasattr(node, 'keys') else [])]
        near = difflib.get_close_matches(key, every, n=3, cutoff=0.6)
        near += [k for k in difflib.get_close_matches('.'.join(walked + [part]), here, n=3,
                                                      cutoff=0.5) if k not in near]
        hint = f' Did you mean {" or ".join(near[:3])}?' if near else ''
        names = sorted(k.rsplit('.', 1)[-1] for k in here)
        where = '.'.join(walked) or 'the top level'
        return (f'--config.{key}: {path} has no field {".".join(walked + [part])!r}.{hint} '
                f'Fields of {where}: {", ".join(names)}.')
      node = node[part]
      walked.append(part)
  return None


if __name__ == '__main__':
  allocator.reexec_with_huge_pages()   # once, before any buffer exists: see mars_jax/allocator.py
  # Before DEFINE_config_file: it loads the file and applies --config.* overrides right here.
  _error = check_argv(sys.argv)
  if _error:
    print(f'config error: {_error}', file=sys.stderr)
    sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG, 'Config file (configs/*.py); default: the embedded tiny config.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (see README: workdir layout).')
_STAGES = flags.DEFINE_list('stages', ','.join(STAGES), f'Stages to run, a subset of {STAGES}.')
_FORCE = flags.DEFINE_bool(
    'force', False, 'Run stages even when marked complete: prepare, sample and evaluate redo their '
    'work; training stages resume from their last checkpoint (to retrain, delete DIR/<stage>). '
    'Where the run would replace data or checkpoints made with another config (refused without '
    '--force), --force deletes that work first and prints each folder it deletes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'host:port of process 0 for a multi-process run (env MARS_COORDINATOR); '
    'TPU pods and SLURM are detected without it.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run (env MARS_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1 (env MARS_PROCESS_ID).')


def parse_stages(stages):
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise config_lib.ConfigError(f'--stages: unknown {unknown}; choose from {",".join(STAGES)}.')
  return [s for s in STAGES if s in stages]  # always in pipeline order


def _barrier(name):
  """All processes wait here (a no-op with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def run(config, workdir, stages=STAGES, force=False, out=print):
  """Validates `config`, checks it against what `workdir` holds, then runs `stages` in order;
  returns nothing, raises on failure.

  Nothing is written before every check has passed (config fields, batch versus devices, each
  stage's input, data and checkpoints of another config that the run would replace: refused, or
  deleted under `force` after saying so); config.json is written only for an accepted run.
  With several processes, each runs this; `prepare` runs on process 0 alone (the others wait),
  training stages run everywhere (the engine shards the data by process), and only process 0
  writes config.json, deletes and prints.
  """
  import jax
  from mars_jax import distributed
  shapes = config_lib.derive(config)
  stages = parse_stages(stages)
  main_process = distributed.is_main()
  if not main_process:
    out = lambda *a, **k: None
  fs.check_workdir(workdir)
  new_workdir = not fs.is_remote(workdir) and not fs.exists(workdir)
  lock = _lock(workdir, main_process, out)   # one run (one job) a workdir, before any look
  accepted = False
  try:
    plan = workdir_lib.check_run(config, workdir, stages, force, num_devices=jax.device_count(),
                                 num_processes=jax.process_count())
    _barrier('mars_jax/checked')          # every process has looked before anything changes
    if main_process:
      workdir_lib.apply(plan, out)
      fs.write_text(fs.join(workdir, workdir_lib.CONFIG_JSON),
                    config.to_json_best_effort(indent=2))
    accepted = True
    _barrier('mars_jax/accepted')
    out(f'mars_jax: workdir {workdir}; spectrogram {shapes.spectrogram} -> image {shapes.image} '
        f'-> latent {shapes.latent}; scales {shapes.scales} ({shapes.num_tokens} tokens)')
    for name in stages:
      stage = stages_lib.BY_NAME[name]
      if not force and stage.is_complete(config, workdir):
        out(f'[{name}] complete and matching the config: skipped (--force runs it anyway).')
        continue
      out(f'[{name}] starting')
      t0 = time.time()
      if name != 'prepare' or main_process:
        stage.run(config, workdir)
      _barrier(f'mars_jax/{name}')
      out(f'[{name}] done in {time.time() - t0:.1f}s')
  finally:
    if lock is not None:
      lock.release()
      if new_workdir and not accepted:   # a refused run leaves no trace, not even the folder
        try:
          os.rmdir(workdir)
        except OSError:
          pass


def _lock(workdir, main_process, out):
  """Process 0 takes DIR/.lock for the whole job; every process learns whether it got it."""
  import jax
  import numpy as np
  lock, err = None, None
  if main_process:
    try:
      lock = workdir_lib.Lock(workdir, out).acquire()
    except workdir_lib.WorkdirLocked as e:
      err = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      err = workdir_lib.WorkdirLocked(f'{workdir} is in use by another run (process 0 says '
                                      f'which).')
  if err is not None:
    raise err
  return lock


def _compilation_cache(workdir):
  """A persistent XLA cache in the workdir: restarts and later stages skip recompiling."""
  import jax
  jax.config.update('jax_compilation_cache_dir', fs.join(fs.absolute(workdir), '.xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (the folder every stage writes into).')
  logging.set_verbosity(logging.WARNING)  # orbax/grain INFO is noise; progress goes to stdout
  from mars_jax import distributed  # before anything touches a device
  distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  _compilation_cache(_WORKDIR.value)
  try:
    run(_CONFIG.value, _WORKDIR.value, _STAGES.value, _FORCE.value)
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    sys.exit(2)
  except fs.WorkdirError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # the engine's failures carry their own instructions
    from mars_jax.train import engine
    if isinstance(e, engine.Preempted):
      print(str(e), file=sys.stderr)
      sys.exit(143)  # 128 + SIGTERM: schedulers requeue, a rerun resumes
    from mars_jax.data import pipeline
    from mars_jax.train import checkpoint
    if isinstance(e, (engine.NonFiniteLoss, checkpoint.CheckpointError, pipeline.DataError)):
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
    raise


if __name__ == '__main__':
  app.run(main)
