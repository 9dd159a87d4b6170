"""Weak scaling of the one training engine over 1, 2, 4, 8 simulated CPU devices.

Per-device batch fixed, so the global batch grows with the mesh. Each device count runs in its
own subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax
starts) and trains the tiny config's VAR (a real transformer step: AdaLN blocks under nn.scan)
on random tokens through `engine.train`, then checks the result: params keep their shapes, live
on the whole mesh, the batch axis is split over data x fsdp, and the loss is finite.

Simulated devices share this machine's cores, so step time grows with N: the table shows the
sharded program is correct at every size, not how fast a pod would be.
Run: python -m mars_jax.bench scaling [--devices=1,2,4,8] [--per_device_batch=2] [--steps=6]
"""
from mars_jax.bench import machine
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _machine() -> str:
  return machine.describe(with_jax=False)


class RandomBatches:
  """Endless seeded batches with a grain-style get_state/set_state (the engine checkpoints it)."""

  def __init__(self, rows, shapes, vocab, n_inst):
    self.rows, self.shapes, self.vocab, self.n_inst, self.i = rows, shapes, vocab, n_inst, 0

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = int(s['i'])

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np
    r = np.random.default_rng(self.i)
    self.i += 1
    s = self.shapes
    first = s.scales[0] ** 2
    return {'pitch': r.integers(0, s.num_pitches, self.rows).astype(np.int32),
            'instrument': r.integers(0, self.n_inst, self.rows).astype(np.int32),
            'teacher': r.normal(size=(self.rows, s.num_tokens - first, s.latent[2])
                                ).astype(np.float32),
            'tokens': r.integers(0, self.vocab, (self.rows, s.num_tokens)).astype(np.int32)}


def _tiny_config():
  """configs/tiny.py, loaded the way the CLI loads a config file."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg_tiny',
                                                os.path.join(ROOT, 'configs', 'tiny.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _child(n, per_device, steps):
  """Runs in the subprocess: one engine.train of the VAR on n devices; prints a JSON line."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mars_jax import config as config_lib
  from mars_jax.models import autoregressor as ar
  from mars_jax.train import engine, partitioning

  assert jax.device_count() == n, (jax.device_count(), n)
  config = _tiny_config()
  tc = config.autoregressor.train
  tc.batch_size, tc.steps = per_device * n, steps
  tc.checkpoint_every, tc.log_every, tc.eval_every = steps, steps // 2, steps
  shapes = config_lib.derive(config)
  n_inst = len(config.data.synthetic.families)
  model = ar.from_config(config, shapes, n_inst)

  def init(rng, b):
    return model.init({'params': rng}, b['pitch'], b['instrument'], b['teacher'])['params']

  def loss(params, b, rng, step, frozen):
    logits = model.apply({'params': params}, b['pitch'], b['instrument'], b['teacher'],
                         train=True, rngs={'dropout': rng})
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, b['tokens'][..., None], -1).mean()
    return engine.Loss(nll, {})

  task = engine.Task(init=init, loss=loss)
  with tempfile.TemporaryDirectory() as d:
    t0 = time.time()
    state = engine.train(task, config, 'autoregressor', d, lambda: RandomBatches(
        per_device * n, shapes, config.tokenizer.codebook_size, n_inst))
    wall = time.time() - t0
    with open(os.path.join(d, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
  mesh = partitioning.make_mesh(config)
  # Checks: every param spans the whole mesh, shapes do not depend on n, loss finite.
  leaves = jax.tree.leaves(state.params)
  assert all(x.sharding.mesh.size == n for x in leaves)
  n_params = sum(int(np.prod(x.shape)) for x in leaves)
  batch = partitioning.put_batch(next(RandomBatches(per_device * n, shapes, 256, n_inst)), mesh)
  rows_per_device = {int(s.data.shape[0]) for s in batch['tokens'].addressable_shards}
  assert rows_per_device == {per_device}, rows_per_device
  assert all(np.isfinite(r['loss']) for r in rows)
  sps = rows[-1]['steps_per_sec']   # the second window: no first-step effects
  print('RESULT' + json.dumps({
      'devices': n, 'mesh': dict(mesh.shape), 'global_batch': per_device * n,
      'rows_per_device': per_device, 'params': n_params, 'step_ms': 1000.0 / sps,
      'examples_per_s': sps * per_device * n, 'loss': rows[-1]['loss'], 'wall_s': wall}))


def main(argv):
  ap = argparse.ArgumentParser(prog='python -m mars_jax.bench scaling')
  ap.add_argument('--devices', default='1,2,4,8')
  ap.add_argument('--per_device_batch', type=int, default=2)
  ap.add_argument('--steps', type=int, default=6)
  ap.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    _child(a.child, a.per_device_batch, a.steps)
    return 0
  results = []
  for n in (int(x) for x in a.devices.split(',')):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, '-m', 'mars_jax.bench.scaling', f'--child={n}',
                        f'--per_device_batch={a.per_device_batch}', f'--steps={a.steps}'],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith('RESULT')]
    if r.returncode or not line:
      print(f'{n} devices failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}', file=sys.stderr)
      return 1
    results.append(json.loads(line[-1][len('RESULT'):]))
  import jax
  print(f'\nWeak scaling, tiny-config VAR ({results[0]["params"] / 1e6:.2f} M params), '
        f'{a.per_device_batch} rows per device, CPU-simulated devices on {_machine()}; '
        f'jax {jax.__version__}; {datetime.date.today().isoformat()}. Correctness, not speed: '
        f'simulated devices share the cores.\n')
  print('| devices | mesh (data, fsdp, tensor) | global batch | step ms | examples/s | loss |')
  print('|---|---|---|---|---|---|')
  for r in results:
    m = r['mesh']
    print(f'| {r["devices"]} | ({m["data"]}, {m["fsdp"]}, {m["tensor"]}) | {r["global_batch"]} '
          f'| {r["step_ms"]:.0f} | {r["examples_per_s"]:.1f} | {r["loss"]:.3f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
