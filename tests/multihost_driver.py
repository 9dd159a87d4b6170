"""One process of the multi-process test: join, train the tiny tokenizer then the autoregressor a
few steps each, sample, dump results.

  python -m tests.multihost_driver --workdir=W --run=NAME [--coordinator=H:P --num_processes=N
      --process_id=I] [--die_process=I --die_at_batch=K --die_after_ckpt=S]

Trains through the real stage Tasks and the one engine (no CLI), so the test exercises the same
sharding, data and checkpoint code as `python -m mars_jax.main`. W/NAME is laid out as a workdir
(W/NAME/data links to the shared W/data) so the autoregressor goes through its own stage `run`,
with the just-trained tokenizer frozen. Process 0 writes W/NAME/result.npz and W/NAME/ar.npz (the
full tokenizer and VAR params, gathered); the losses are in W/NAME/{tokenizer,autoregressor}/
metrics.jsonl. `--die_*` makes process I SIGKILL itself before reading tokenizer batch K, once
checkpoint S is on disk: a hard crash mid-run with a known last checkpoint.
"""
import argparse
import os
import signal
import time

from tests.helpers import load_config

STEPS, BATCH, CKPT_EVERY = 4, 8, 2
AR_STEPS = 3


def tiny_config(steps=STEPS):
  """configs/tiny.py shrunk for a test: 96 notes, 8-wide tokenizer, batch 8, checkpoints every 2;
  a 1-block, 32-wide VAR trained AR_STEPS steps (one checkpoint, at the end)."""
  c = load_config('tiny')
  c.data.synthetic.per_pitch_family = 1
  c.data.prepare_workers = 1
  c.data.loader_workers = 0
  k = c.tokenizer   # a smaller tokenizer: compile time dominates on a shared 2-core machine
  k.channels, k.groups, k.latent_channels, k.codebook_size = 8, 4, 8, 32
  t = c.tokenizer.train
  t.steps, t.batch_size, t.checkpoint_every = steps, BATCH, CKPT_EVERY
  t.log_every, t.eval_every, t.keep_checkpoints = 1, 10_000, 3
  v = c.autoregressor
  v.depth, v.width, v.heads = 1, 32, 2
  t = c.autoregressor.train
  t.steps, t.batch_size, t.checkpoint_every = AR_STEPS, BATCH, AR_STEPS
  t.log_every, t.eval_every = 1, 10_000   # the engine still evaluates once, at the last step
  t.warmup_steps = 0   # else step 0 trains at lr 0 and 3 steps leave the VAR near its init
  c.sample.num, c.sample.batch_size = 4, 2   # two batches: one for each of two processes
  return c


class DieAt:
  """Wraps the data iterator: the chosen process kills itself (SIGKILL) at a given batch."""

  def __init__(self, it, batch, ckpt_path, enabled):
    self.it, self.batch, self.ckpt_path, self.enabled, self.n = it, batch, ckpt_path, enabled, 0

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)

  def __iter__(self):
    return self

  def __next__(self):
    self.n += 1   # the engine reads one batch for shapes first, then rewinds: count it too
    if self.enabled and self.n - 1 == self.batch:
      deadline = time.time() + 60
      while not os.path.isdir(self.ckpt_path) and time.time() < deadline:
        time.sleep(0.2)   # the async save finalises in the background
      print(f'driver: dying at batch {self.batch}; {self.ckpt_path} exists: '
            f'{os.path.isdir(self.ckpt_path)}', flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return next(self.it)


def _save(path, params):
  """Gathers `params` (sharded over all processes) and process 0 writes them to `path`."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from mars_jax import distributed
  params = multihost_utils.process_allgather(params, tiled=True)  # full arrays everywhere
  if distributed.is_main():
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def _link_data(workdir, run_dir):
  """Lays out W/NAME as a workdir: its data/ is the prepared W/data (every process tries)."""
  os.makedirs(run_dir, exist_ok=True)
  link = os.path.join(run_dir, 'data')
  if not os.path.lexists(link):
    try:
      os.symlink(os.path.relpath(os.path.join(workdir, 'data'), run_dir), link)
    except FileExistsError:
      pass


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--workdir', required=True)   # holds data/ (prepared by the test)
  ap.add_argument('--run', required=True)       # subfolder for this run's stage output
  ap.add_argument('--coordinator')
  ap.add_argument('--num_processes', type=int)
  ap.add_argument('--process_id', type=int)
  ap.add_argument('--die_process', type=int, default=-1)
  ap.add_argument('--die_at_batch', type=int, default=-1)
  ap.add_argument('--die_after_ckpt', type=int, default=-1)
  ap.add_argument('--cache')                    # persistent XLA cache shared by the runs
  a = ap.parse_args()

  from mars_jax import distributed
  pi, pc = distributed.maybe_initialize(a.coordinator, a.num_processes, a.process_id)

  import jax
  from jax.experimental import multihost_utils
  if a.cache:
    jax.config.update('jax_compilation_cache_dir', a.cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  from mars_jax.data import pipeline
  from mars_jax import trained
  from mars_jax import workdir as workdir_lib
  from mars_jax.stages import autoregressor, sample, tokenizer
  from mars_jax.train import engine, partitioning

  config = tiny_config()
  run_dir = os.path.join(a.workdir, a.run)
  _link_data(a.workdir, run_dir)
  stage_dir = os.path.join(run_dir, 'tokenizer')
  data_dir = workdir_lib.data_dir(run_dir)
  fp = workdir_lib.fingerprint(config, tokenizer.NAME)
  workdir_lib.claim(stage_dir, fp, tokenizer.NAME)
  task, _ = tokenizer.make_task(config)
  ckpt = os.path.join(stage_dir, 'checkpoints', str(a.die_after_ckpt))
  make_it = lambda: DieAt(pipeline.make_iterator(config, data_dir, 'train', batch_size=BATCH),
                          a.die_at_batch, ckpt, pi == a.die_process)
  print(f'driver: process {pi}/{pc}, {jax.local_device_count()} local of '
        f'{jax.device_count()} devices', flush=True)
  state = engine.train(task, config, 'tokenizer', stage_dir, make_it)
  step = int(jax.device_get(state.step))
  workdir_lib.mark_complete(stage_dir, fp, step=step)   # what tokenizer.run does after training
  _save(os.path.join(run_dir, 'result.npz'), state.params)
  print(f'driver: process {pi} tokenizer done at step {step}', flush=True)
  if pc > 1:   # the others must see the completion marker (mars_jax.main's barrier)
    multihost_utils.sync_global_devices('driver/tokenizer')

  autoregressor.run(config, run_dir)   # loads the tokenizer checkpoint, trains the VAR
  n_instruments = trained.num_instruments(config, pipeline.load_manifest(data_dir))
  ar_params, _ = trained.load_autoregressor(config, run_dir, partitioning.make_mesh(config),
                                            n_instruments)
  _save(os.path.join(run_dir, 'ar.npz'), ar_params)
  sample.run(config, run_dir)          # the stage as the CLI runs it: batches over the processes
  print(f'driver: process {pi} done', flush=True)


if __name__ == '__main__':
  main()
