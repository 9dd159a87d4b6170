"""Input-pipeline throughput at the base config's shape: is the loader fast enough to feed a GPU?

Writes a temporary dataset of 512 x 512 float16 spectrograms (what `prepare` writes for
NSynth), reads it through `pipeline.make_iterator` (decode + CMX -> 64 x 64 x 64 float32)
and prints batches/s per worker count as a markdown row.
Run: python -m mars_jax.bench loader [--workers=0,2] [--batch=64] [--seconds=10]
"""
from mars_jax.bench import machine
import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def _machine() -> str:
  return machine.describe(with_jax=False)


def write_dataset(root, config, n):
  """n random records at the config's spectrogram shape in two shards + manifest."""
  from mars_jax import config as config_lib
  from mars_jax.data import records
  shapes = config_lib.derive(config)
  data = os.path.join(root, 'data')
  os.makedirs(data)
  rng = np.random.default_rng(0)
  lo = shapes.pitch_lo
  names, halves = [], (n // 2, n - n // 2)
  for k, size in enumerate(halves):
    name = f'train-{k:05d}-of-00002.array_record'
    recs = (records.encode(rng.uniform(-1, 1, shapes.spectrogram).astype(np.float16),
                           {'pitch': lo + i % shapes.num_pitches, 'velocity': 100,
                            'family': i % 10, 'instrument': i}) for i in range(size))
    records.write_shard(os.path.join(data, name), recs)
    names.append(name)
  manifest = {'splits': {'train': {'count': n, 'shards': names, 'bytes': 0}},
              'spectrogram': {'shape': list(shapes.spectrogram)},
              'vocab': {'family': [str(i) for i in range(10)],
                        'instrument': [str(i) for i in range(n)],
                        'pitch_range': list(config.data.pitch_range)}}
  with open(os.path.join(data, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  return data


def measure(config, data_dir, batch, workers, seconds, warmup=3):
  """Batches/s after `warmup` batches (worker start-up and first reads excluded)."""
  from mars_jax.data import pipeline
  it = pipeline.make_iterator(config, data_dir, 'train', batch_size=batch, process_index=0,
                              process_count=1, worker_count=workers, seed=0)
  try:
    for _ in range(warmup):
      next(it)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      b = next(it)
      count += 1
    dt = time.perf_counter() - t0
    assert b['image'].shape[0] == batch
    return count / dt, b['image'].shape
  finally:
    it.close()


def main(argv=None):
  p = argparse.ArgumentParser(prog='mars_jax.bench loader', description=__doc__)
  p.add_argument('--config', default='base', help='configs/<name>.py giving the shapes')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--workers', default='0,2', help='comma-separated worker counts')
  p.add_argument('--records', type=int, default=512)
  p.add_argument('--seconds', type=float, default=10.0)
  args = p.parse_args(argv)

  from absl import flags  # grain's worker processes read absl flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', f'{args.config}.py')
  spec = importlib.util.spec_from_file_location(f'cfg_{args.config}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()

  root = tempfile.mkdtemp(prefix='mars_loader_bench_')
  try:
    t0 = time.perf_counter()
    data_dir = write_dataset(root, config, args.records)
    print(f'wrote {args.records} records in {time.perf_counter() - t0:.1f}s to {data_dir}',
          file=sys.stderr)
    rows = []
    for w in (int(v) for v in args.workers.split(',')):
      rate, shape = measure(config, data_dir, args.batch, w, args.seconds)
      rows.append((w, rate, shape))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print('| machine | date | config | batch | image | workers | batches/s | examples/s |')
  print('|---|---|---|---|---|---|---|---|')
  for w, rate, shape in rows:
    print(f'| {_machine()} | {datetime.date.today()} | {args.config} | {args.batch} | '
          f'{"x".join(map(str, shape[1:]))} f32 | {w} | {rate:.2f} | {rate * args.batch:.0f} |')


if __name__ == '__main__':
  main(sys.argv[1:])
