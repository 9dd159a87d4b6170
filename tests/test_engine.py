"""The training engine on a toy MLP: sharding equivalence, resume, preemption, NaN, bad config,
logs."""
import json
import os
import signal

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import fake_gcs
from tests.helpers import read_tensorboard_scalars

from mars_jax import defaults
from mars_jax.config import ConfigError
from mars_jax.train import checkpoint as ckpt
from mars_jax.train import engine
from mars_jax.train.partitioning import make_mesh

B = 8          # global batch


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """Persistent XLA cache for this module: the resume tests recompile identical steps (~4x
  faster)."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update(names[1], 0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  try:
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except Exception:  # private API; resetting is only hygiene
    pass
D_IN, D_H, D_OUT = 8, 16, 4


def _example(i):
  r = np.random.default_rng(int(i))
  x = r.normal(size=(D_IN,)).astype(np.float32)
  y = np.tanh(x[:D_OUT] * 2.0 - x[D_OUT:]).astype(np.float32)
  return {'x': x, 'y': y, 'idx': np.int32(i)}


def make_iter(n=10_000):
  """A real grain pipeline: endless enough, deterministic, exact get_state/set_state."""
  return iter(grain.MapDataset.range(n).map(_example).batch(B).to_iter_dataset())


class Hooked:
  """Wraps an iterator; calls hook(batch_number) before yielding (raise / send signals)."""

  def __init__(self, it, hook):
    self.it, self.hook = it, hook

  def __iter__(self):
    return self

  def __next__(self):
    b = next(self.it)
    self.hook(int(b['idx'][0]) // B)
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    h = nn.Dense(D_H, kernel_init=nn.with_logical_partitioning(init, ('embed', 'mlp')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(x)
    h = nn.gelu(h)
    # 3 does not divide fsdp=4 or 2: the engine must replicate this dim instead of failing.
    odd = self.param('odd', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)), (3,))
    h = h * jnp.mean(odd)
    return nn.Dense(D_OUT, kernel_init=nn.with_logical_partitioning(init, ('mlp', 'embed')),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(h)


def make_task(nan_at=None, with_eval=False):
  model = MLP()

  def loss(params, batch, rng, step, frozen):
    pred = model.apply({'params': params}, batch['x'])
    l = jnp.mean((pred.astype(jnp.float32) - batch['y']) ** 2)
    if nan_at is not None:
      l = jnp.where(step >= nan_at, jnp.nan, l)
    # idx_sum fingerprints which examples the step saw (checks the batch sequence on resume).
    return engine.Loss(l, {'idx_sum': jnp.sum(batch['idx']).astype(jnp.float32)})

  def eval_fn(params, batch, frozen):
    pred = model.apply({'params': params}, batch['x'])
    return {'mse': jnp.mean((pred - batch['y']) ** 2)}

  return engine.Task(init=lambda rng, b: model.init(rng, b['x'])['params'], loss=loss,
                     eval_fn=eval_fn if with_eval else None)


def make_config(steps=6, mesh=(1, 1, 1), **train):
  c = defaults.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  t = c.tokenizer.train
  t.steps, t.batch_size, t.lr, t.warmup_steps = steps, B, 1e-2, 2
  t.checkpoint_every, t.log_every, t.eval_every = 2, 1, 1000
  for k, v in train.items():
    t[k] = v
  return c


def read_jsonl(stage_dir):
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path):
  results = {}
  for mesh in [(1, 1, 1), (2, 4, 1), (2, 2, 2)]:
    devices = jax.devices()[:1] if mesh == (1, 1, 1) else jax.devices()
    d = str(tmp_path / ('m' + '_'.join(map(str, mesh))))
    state = engine.train(make_task(), make_config(steps=3, mesh=mesh), 'tokenizer', d,
                         make_iter, devices=devices)
    results[mesh] = (state, read_jsonl(d))
  ref_state, ref_log = results[(1, 1, 1)]
  for mesh in [(2, 4, 1), (2, 2, 2)]:
    state, log = results[mesh]
    kernel = state.params['Dense_0']['kernel']
    assert len(kernel.sharding.device_set) == 8, 'params should live on the whole mesh'
    assert not kernel.sharding.is_fully_replicated, f'{mesh}: kernel not sharded'
    # Optimizer slots shard like their params.
    mu = state.opt_state[1][0].mu['Dense_0']['kernel']
    assert mu.sharding.is_equivalent_to(kernel.sharding, 2)
    np.testing.assert_allclose([r['loss'] for r in log], [r['loss'] for r in ref_log], rtol=1e-5)
    assert_trees_close(state.params, ref_state.params)
    assert_trees_close(state.opt_state, ref_state.opt_state)


def _final(stage_dir, config, task=None, it_fn=make_iter):
  return engine.train(task or make_task(), config, 'tokenizer', stage_dir, it_fn,
                      devices=jax.devices())


def _trace(stage_dir):
  return [(r['step'], r['idx_sum'], r['loss']) for r in read_jsonl(stage_dir)]


def assert_same_trace(got, want):
  """Same logged steps, same examples per step (idx_sum), same losses."""
  assert [t[:2] for t in got] == [t[:2] for t in want]
  np.testing.assert_allclose([t[2] for t in got], [t[2] for t in want], rtol=1e-6)


@pytest.mark.slow
def test_kill_and_resume_match_uninterrupted(tmp_path, monkeypatch):
  cfg = make_config(steps=8, mesh=(2, 4, 1), ema_decay=0.9)
  ref = _final(str(tmp_path / 'ref'), cfg)
  ref_trace = _trace(str(tmp_path / 'ref'))
  assert len(ref_trace) == 8

  # 1) a crash (exception from the data pipeline) while fetching batch 5: resume from step 4.
  # In a bucket (the GCS stand-in): metrics.jsonl there is re-uploaded whole, never appended.
  def crash(n):
    if n == 5:
      raise RuntimeError('disk on fire')
  fake_gcs.use(tmp_path / 'bucket', monkeypatch)
  d = 'gs://mars-test/crash'
  with pytest.raises(RuntimeError, match='disk on fire'):
    _final(d, cfg, it_fn=lambda: Hooked(make_iter(), crash))
  assert ckpt.manager(ckpt.ckpt_dir(d)).latest_step() == 4
  local = str(tmp_path / 'bucket' / 'mars-test' / 'crash')
  assert [t[0] for t in _trace(local)] == [1, 2, 3, 4, 5]  # all logged before the crash, uploaded
  state = _final(d, cfg)
  assert_trees_close(state.params, ref.params, tol=1e-6)
  assert_trees_close(state.ema_params, ref.ema_params, tol=1e-6)
  assert_same_trace(_trace(local), ref_trace)       # same batches, in the same order

  # 2) SIGTERM mid-run (during batch 2, i.e. step 3): save at step 3, raise Preempted, resume.
  def term(n):
    if n == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  d = str(tmp_path / 'term')
  with pytest.raises(engine.Preempted) as e:
    _final(d, cfg, it_fn=lambda: Hooked(make_iter(), term))
  assert e.value.step == 3
  assert 3 in ckpt.manager(ckpt.ckpt_dir(d)).all_steps()       # off the checkpoint_every grid
  assert signal.getsignal(signal.SIGTERM) is not None           # handler restored
  state = _final(d, cfg)
  assert_trees_close(state.params, ref.params, tol=1e-6)
  assert_same_trace(_trace(d), ref_trace)


class FakeTime:
  """The engine's `time` module with a monotonic clock the test sets (wall time stays real)."""

  def __init__(self):
    self.now = 0.0

  def monotonic(self):
    return self.now

  def __getattr__(self, name):
    import time
    return getattr(time, name)


@pytest.mark.slow
def test_checkpoint_by_wall_time_saves_off_the_step_grid_and_resumes_equal(tmp_path, monkeypatch):
  """checkpoint_minutes=3 with a fake clock at 1 minute a batch: saves at steps 4 and 7 (batches
  0..3 took 3 minutes; checkpoint_every=8 would save only at the end); a crash at batch 6
  resumes from step 4 and ends where the uninterrupted run ends."""
  clock = FakeTime()
  monkeypatch.setattr(engine, 'time', clock)

  def tick(n):     # fetching batch n: n minutes since the start
    clock.now = 60.0 * n
  one = jax.devices()[:1]
  cfg = make_config(steps=8, checkpoint_every=8, keep_checkpoints=5, checkpoint_minutes=3)
  run = lambda d, hook=tick: engine.train(make_task(), cfg, 'tokenizer', d,
                                          lambda: Hooked(make_iter(), hook), devices=one)
  ref_dir = str(tmp_path / 'ref')
  ref = run(ref_dir)
  assert ckpt.manager(ckpt.ckpt_dir(ref_dir)).all_steps() == [4, 7, 8]

  def crash(n):
    tick(n)
    if n == 6:
      raise RuntimeError('node lost')
  d = str(tmp_path / 'crash')
  with pytest.raises(RuntimeError, match='node lost'):
    run(d, crash)
  assert ckpt.manager(ckpt.ckpt_dir(d)).latest_step() == 4
  state = run(d)
  assert_trees_close(state.params, ref.params, tol=1e-6)
  assert_same_trace(_trace(d), _trace(ref_dir))


def test_preemption_is_agreed_every_n_steps_not_every_step(monkeypatch):
  """Two processes (faked): the blocking all-gather runs at steps 0, 5, 10 only; between them no
  process acts, so all save the same step; a SIGTERM on the other process is seen at the next
  agreement step, and process 0's clock decides a timed save for everyone."""
  from jax.experimental import multihost_utils
  other = {'row': [0, 0]}
  calls = []

  def gather(x):
    calls.append(np.asarray(x).tolist())
    return np.stack([np.asarray(x), np.int32(other['row'])])
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', gather)
  with engine.PreemptionPoll(every=5) as poll:
    assert [poll.agree(s, False) for s in range(12)] == [(False, False)] * 12
    assert len(calls) == 3                                   # steps 0, 5 and 10
    other['row'] = [1, 1]                                    # SIGTERM there; its clock ignored
    assert poll.agree(13, True) == (False, False) and len(calls) == 3
    assert poll.agree(15, False) == (True, False)
    other['row'] = [0, 0]
    assert poll.agree(20, True) == (False, True)             # process 0's clock: a timed save
    os.kill(os.getpid(), signal.SIGTERM)                     # here: only the flag is set
    assert poll.agree(21, False) == (False, False)
    assert poll.agree(25, False) == (True, False)
  with engine.PreemptionPoll(every=5) as poll:               # one process: every step, no gather
    monkeypatch.setattr(jax, 'process_count', lambda: 1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert poll.agree(3, False) == (True, False) and len(calls) == 6


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path):
  d = str(tmp_path / 'nan')
  with pytest.raises(engine.NonFiniteLoss) as e:
    _final(d, make_config(steps=10, mesh=(2, 4, 1)), task=make_task(nan_at=5))
  msg = str(e.value)
  assert 'step 5' in msg and 'step 4' in msg and ckpt.ckpt_dir(d) in msg, msg
  steps = ckpt.manager(ckpt.ckpt_dir(d)).all_steps()
  assert max(steps) == 4, steps                                 # nothing saved after the NaN
  assert all(np.isfinite(r['loss']) for r in read_jsonl(d))


def _never():
  raise AssertionError('the data pipeline (and so compilation) must not start on a bad config')


@pytest.mark.parametrize('mesh,batch,field', [
    ((3, 1, 1), B, 'mesh.data*mesh.fsdp*mesh.tensor'),
    ((-1, 1, 3), B, 'mesh'),
    ((2, 4, 1), 12, 'tokenizer.train.batch_size'),
])
def test_bad_config_fails_before_compiling(tmp_path, mesh, batch, field):
  cfg = make_config(mesh=mesh, batch_size=batch)
  with pytest.raises(ConfigError, match=field.replace('*', r'\*').replace('.', r'\.')):
    engine.train(make_task(), cfg, 'tokenizer', str(tmp_path), _never)


@pytest.mark.slow
def test_metrics_jsonl_eval_tensorboard_and_restore_params(tmp_path):
  d = str(tmp_path / 'log')
  evals = []

  def on_eval(params, step, stage_dir):
    evals.append(step)

  def init_extra(rng, params):     # non-gradient state, sharded like a param
    return {'count': jnp.zeros((), jnp.int32),
            'table': nn.with_logical_partitioning(jnp.zeros, ('embed', 'mlp'))((D_IN, D_H))}

  def after_step(params, extra, aux, rng):
    return params, {'count': extra['count'] + 1, 'table': extra['table'] + 1.0}

  frozen = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: 'Dense_1' not in jax.tree_util.keystr(path), p)
  task = make_task(with_eval=True)
  task = engine.Task(**{**task.__dict__, 'on_eval': on_eval, 'init_extra': init_extra,
                        'after_step': after_step, 'trainable': frozen})
  cfg = make_config(steps=7, mesh=(2, 2, 2), log_every=3, eval_every=4, ema_decay=0.5,
                    compute_dtype='bfloat16')
  eval_iter = lambda: iter([_batch(i) for i in range(2)])
  state = engine.train(task, cfg, 'tokenizer', d, make_iter, eval_iter)
  log = read_jsonl(d)
  assert [r['step'] for r in log] == [3, 4, 6, 7]                 # log_every, eval steps, last
  assert all(np.isfinite(r['loss']) and 'lr' in r and 'steps_per_sec' in r for r in log)
  assert [r['step'] for r in log if 'eval/mse' in r] == [4, 7] == evals
  assert jax.tree.leaves(state.params)[0].dtype == jnp.float32   # fp32 master under bf16 compute
  assert int(state.extra_state['count']) == 7
  assert float(state.extra_state['table'].mean()) == 7.0
  assert not state.extra_state['table'].sharding.is_fully_replicated
  assert float(jnp.abs(state.params['Dense_1']['bias']).max()) == 0.0   # frozen: not updated
  assert float(jnp.abs(state.params['Dense_0']['bias']).max()) > 0.0

  tb = read_tensorboard_scalars(os.path.join(d, 'tensorboard'))   # the one events file
  assert [s for s, _ in tb['loss']] == [3, 4, 6, 7] and [s for s, _ in tb['eval/mse']] == [4, 7]
  np.testing.assert_allclose([v for _, v in tb['loss']], [r['loss'] for r in log], rtol=1e-6)

  # A later stage loads the frozen (EMA) params onto its own mesh, here one device.
  mesh1 = make_mesh(make_config(mesh=(1, 1, 1)), jax.devices()[:1])
  target = engine.abstract_params(task, cfg, mesh1, _batch(0))
  params = ckpt.restore_params(ckpt.ckpt_dir(d), target)
  assert_trees_close(params, state.ema_params, tol=0)
  assert jax.tree.leaves(params)[0].sharding.device_set == {jax.devices()[0]}
  # Rerunning a finished stage does no work and returns the saved state.
  again = engine.train(task, cfg, 'tokenizer', d, make_iter, eval_iter)
  assert int(again.step) == 7 and len(read_jsonl(d)) == 4


def _batch(i):
  ex = [_example(10_000 + i * B + j) for j in range(B)]
  return {k: np.stack([e[k] for e in ex]) for k in ex[0]}
