"""CLI: flags -> validated config -> stages, in order, each resumable.

  python -m mars_jax.main --config=configs/tiny.py --workdir=/tmp/mars \
      [--stages=prepare,tokenizer] [--config.tokenizer.train.steps=100]
"""
import importlib
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mars_jax import config as config_lib
from mars_jax import fs

STAGES = ('prepare', 'tokenizer', 'autoregressor', 'sample', 'evaluate')
# Each stage module has `run(config, workdir)` and `is_complete(config, workdir) -> bool`.
STAGE_MODULES = {
    'prepare': 'mars_jax.data.prepare',
    'tokenizer': 'mars_jax.stages.tokenizer',
    'autoregressor': 'mars_jax.stages.autoregressor',
    'sample': 'mars_jax.stages.sample',
    'evaluate': 'mars_jax.stages.evaluate',
}
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG, 'Config file (configs/*.py); default: the embedded tiny config.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (see README: workdir layout).')
_STAGES = flags.DEFINE_list('stages', ','.join(STAGES), f'Stages to run, a subset of {STAGES}.')
_FORCE = flags.DEFINE_bool(
    'force', False, 'Run stages even when marked complete: prepare, sample and evaluate redo their '
    'work; training stages resume from their last checkpoint (to retrain, delete DIR/<stage>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'host:port of process 0 for a multi-process run (env MARS_COORDINATOR); '
    'TPU pods and SLURM are detected without it.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run (env MARS_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1 (env MARS_PROCESS_ID).')


class StageNotImplemented(RuntimeError):
  pass


def load_stage(name):
  """Imports a stage module, telling a missing stage apart from a broken one."""
  module = STAGE_MODULES[name]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name and module.startswith(e.name):
      raise StageNotImplemented(f'stage {name!r} is not implemented yet ({module} is missing).')
    raise


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
  """Validates `config`, then runs `stages` in order; returns nothing, raises on failure.

  With several processes, each runs this; `prepare` runs on process 0 alone (the others wait),
  training stages run everywhere (the engine shards the data by process), and only process 0
  writes config.json and prints.
  """
  from mars_jax import distributed
  shapes = config_lib.derive(config)
  stages = parse_stages(stages)
  main_process = distributed.is_main()
  if not main_process:
    out = lambda *a, **k: None
  fs.check_workdir(workdir)
  fs.makedirs(workdir)
  if main_process:
    fs.write_text(fs.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  out(f'mars_jax: workdir {workdir}; spectrogram {shapes.spectrogram} -> image {shapes.image} '
      f'-> latent {shapes.latent}; scales {shapes.scales} ({shapes.num_tokens} tokens)')
  for name in stages:
    stage = load_stage(name)
    if not force and stage.is_complete(config, workdir):
      out(f'[{name}] complete and matching the config: skipped (--force runs it anyway).')
      continue
    out(f'[{name}] starting')
    t0 = time.time()
    if name != 'prepare' or main_process:
      stage.run(config, workdir)
    _barrier(f'mars_jax/{name}')
    out(f'[{name}] done in {time.time() - t0:.1f}s')


def pipeline_errors():
  from mars_jax.data import pipeline
  return pipeline.DataError


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
  except StageNotImplemented as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  except Exception as e:  # the engine's failures carry their own instructions
    from mars_jax.train import engine
    if isinstance(e, engine.Preempted):
      print(str(e), file=sys.stderr)
      sys.exit(143)  # 128 + SIGTERM: schedulers requeue, a rerun resumes
    if isinstance(e, (engine.NonFiniteLoss, pipeline_errors())):
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
    raise


if __name__ == '__main__':
  app.run(main)
