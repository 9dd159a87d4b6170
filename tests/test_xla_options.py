"""`<stage>.train.xla_cpu_options`: XLA options for a stage's train step on a CPU."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax.evaluate import classifiers
from mars_jax.stages import tokenizer as tok_stage
from mars_jax.train import engine
from mars_jax.train import partitioning as part
from tests.helpers import load_config, small_tiny_config


def test_options_parse_like_xla_flags():
  got = config_lib.xla_options(' xla_a=1  --xla_b=LIBRARY_FUSION_TYPE_DOT ', 'f')
  assert got == {'xla_a': '1', 'xla_b': 'LIBRARY_FUSION_TYPE_DOT'}
  assert config_lib.xla_options('', 'f') == {}


@pytest.mark.parametrize('bad', ['xla_a', 'xla_a=', 'a=1', '=1'])
def test_a_bad_option_names_the_field(bad):
  c = load_config('tiny')
  c.autoregressor.train.xla_cpu_options = f'xla_ok=1 {bad}'
  with pytest.raises(config_lib.ConfigError, match=r'autoregressor\.train\.xla_cpu_options'):
    config_lib.derive(c)


def _losses_and_params(config, stage, batch_size=4, steps=3):
  """`steps` updates of a stage's model on one device from the same init and random batch."""
  config[stage].train.batch_size = batch_size
  mesh = part.make_mesh(config, jax.devices()[:1])
  rng = np.random.default_rng(0)
  shape = (batch_size,) + tuple(config_lib.derive(config).image)
  local = {'image': rng.uniform(-1, 1, shape).astype(np.float32)}
  if stage == 'tokenizer':
    task, _ = tok_stage.make_task(config)
  else:
    task, _ = classifiers.make_task(config, 'pitch', 8)
    local['pitch'] = rng.integers(0, 8, batch_size).astype(np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.logical_rules(config)):
    ts = engine.TrainStep(task, config, stage, mesh, part.abstract_batch(local, mesh))
    batch = part.put_batch(local, mesh)
    state = ts.init(batch)
    hlo = ts.compile().as_text()
    losses = []
    for _ in range(steps):
      state, metrics = ts.step(state, batch)
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), hlo


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['tokenizer', 'classifier'])
def test_the_default_cpu_options_compute_the_same_step(stage):
  """A stage's default options (which of its ops XLA hands to the XNNPACK library) change the
  step's speed, not what it computes."""
  assert load_config('tiny')[stage].train.xla_cpu_options     # the default sets some
  with_opts = small_tiny_config()
  without = small_tiny_config(**{f'{stage}__train__xla_cpu_options': ''})
  l1, p1, hlo1 = _losses_and_params(with_opts, stage)
  l0, p0, hlo0 = _losses_and_params(without, stage)
  # The option took effect: it replaces XLA's default list of YNN (XNNPACK) library fusions.
  assert hlo1.count('ynn_fusion') != hlo0.count('ynn_fusion')
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  # Adam divides each gradient by its own running size, so a float-level difference in a
  # near-zero gradient can move that weight by a small fraction of lr (1e-3): atol 1e-4.
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))
