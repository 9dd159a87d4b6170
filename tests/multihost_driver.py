"""One process of the multi-process test: join, train the tiny tokenizer a few steps, dump results.

  python tests/multihost_driver.py --workdir=W --run=NAME [--coordinator=H:P --num_processes=N
      --process_id=I] [--die_process=I --die_at_batch=K --die_after_ckpt=S]

Trains through the real stage Task and the one engine (no CLI), so the test exercises the same
sharding, data and checkpoint code as `python -m mars_jax.main`. Process 0 writes
W/NAME/result.npz (the full params, gathered) and the losses are in W/NAME/tokenizer/metrics.jsonl.
`--die_*` makes process I SIGKILL itself before reading batch K, once checkpoint S is on disk:
a hard crash mid-run with a known last checkpoint.
"""
import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, BATCH, CKPT_EVERY = 4, 8, 2


def tiny_config(steps=STEPS):
  """configs/tiny.py shrunk for a test: 96 notes, 8-wide tokenizer, batch 8, checkpoints every 2."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location('cfg_tiny', os.path.join(root, 'configs', 'tiny.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.synthetic.per_pitch_family = 1
  c.data.prepare_workers = 1
  c.data.loader_workers = 0
  k = c.tokenizer   # a smaller tokenizer: compile time dominates on a shared 2-core machine
  k.channels, k.groups, k.latent_channels, k.codebook_size = 8, 4, 8, 32
  t = c.tokenizer.train
  t.steps, t.batch_size, t.checkpoint_every = steps, BATCH, CKPT_EVERY
  t.log_every, t.eval_every, t.keep_checkpoints = 1, 10_000, 3
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
  import numpy as np
  from jax.experimental import multihost_utils
  if a.cache:
    jax.config.update('jax_compilation_cache_dir', a.cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  from mars_jax.data import pipeline
  from mars_jax.stages import tokenizer
  from mars_jax.train import engine

  config = tiny_config()
  stage_dir = os.path.join(a.workdir, a.run, 'tokenizer')
  data_dir = os.path.join(a.workdir, 'data')
  task, _ = tokenizer.make_task(config)
  ckpt = os.path.join(stage_dir, 'checkpoints', str(a.die_after_ckpt))
  make_it = lambda: DieAt(pipeline.make_iterator(config, data_dir, 'train', batch_size=BATCH),
                          a.die_at_batch, ckpt, pi == a.die_process)
  print(f'driver: process {pi}/{pc}, {jax.local_device_count()} local of '
        f'{jax.device_count()} devices', flush=True)
  state = engine.train(task, config, 'tokenizer', stage_dir, make_it)
  params = multihost_utils.process_allgather(state.params, tiled=True)  # full arrays everywhere
  if distributed.is_main():
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(os.path.join(a.workdir, a.run, 'result.npz'),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
  print(f'driver: process {pi} done at step {int(jax.device_get(state.step))}', flush=True)


if __name__ == '__main__':
  main()
