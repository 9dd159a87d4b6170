"""`python -m mars_jax.bench gpu`: its analytic VAR FLOPs against XLA's count, and --smoke."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from mars_jax import config as config_lib
from mars_jax.bench import gpu
from mars_jax.models import autoregressor as ar


def test_var_model_flops_matches_xla_on_one_block():
  """With depth 1 the scan has one body, so XLA's cost analysis counts the whole forward; the
  analytic count (a third of a train step) must agree with it within the parts it leaves out
  (AdaLN per note, norms, softmax, bias adds)."""
  config = load_config('tiny')
  config.autoregressor.depth, config.autoregressor.width, config.autoregressor.heads = 1, 128, 4
  shapes = config_lib.derive(config)
  model = ar.from_config(config, shapes, num_instruments=4)
  b = 8
  ids = jnp.zeros((b,), jnp.int32)
  teacher = jnp.zeros((b, shapes.num_tokens - shapes.scales[0] ** 2, shapes.latent[2]))
  params = jax.eval_shape(model.init, jax.random.key(0), ids, ids, teacher)
  compiled = jax.jit(model.apply).lower(params, ids, ids, teacher).compile()
  cost = compiled.cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  analytic = gpu.var_model_flops(config, shapes, b) / 3
  assert 0.9 < analytic / xla <= 1.0, (analytic, xla)


@pytest.mark.slow
def test_smoke_run_reports_every_part(tmp_path):
  out = tmp_path / 'gpu.json'
  rc = gpu.main(['--smoke', '--batches', '1', '--out', str(out)])
  result = json.loads(out.read_text())
  assert rc == 0, result
  assert result['smoke'] and result['machine']['platform'] == 'cpu'
  assert result['matmul']['flops_per_s'] > 0
  batch = max(2, jax.device_count())   # 8 under tests/conftest.py's simulated devices
  for stage in ('tokenizer', 'var'):
    r = result[stage]
    assert r['batch'] == batch and r['step_s'] > 0 and len(r['step_s_all']) == 2
    assert r['mfu'] is None                     # no known peak for a CPU: never a made-up MFU
    assert r['flops_per_step'] > 0 and r['xla_bytes'] > 0
  config = load_config('tiny')
  assert result['var']['flops_per_step'] == gpu.var_model_flops(config, config_lib.derive(config),
                                                                batch)
  (row,) = result['sampling']['rows']
  assert row['batch'] == 1
  np.testing.assert_allclose(row['rtf_ab'], 1.024 / row['ab_s'])
