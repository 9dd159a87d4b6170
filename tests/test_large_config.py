"""configs/large.py fits its pod: abstract train states on a simulated 64-device mesh.

Nothing is allocated: jax.eval_shape gives every parameter and AdamW moment with the sharding
the engine would give it, on a (data=8, fsdp=8, tensor=1) mesh of 64 CPU devices (a v5p-128
slice has 64 chips). Checked: the logical rules put the big matrices on fsdp, nothing large is
fully replicated, and the per-device train state (fp32 params + AdamW mu/nu [+ EMA]) stays under
config.mesh.memory_budget_gib. Runs in a subprocess because conftest fixes 8 devices here.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 64
LARGE = 1 << 18   # elements: a parameter this big (1 MiB in fp32) must not be fully replicated

_PROBE = r'''
import json, math, sys
import flax.linen as nn
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from tests.helpers import load_config
from mars_jax import config as config_lib
from mars_jax.stages import tokenizer
from mars_jax.train import engine, partitioning

NSYNTH_FAMILIES = 11   # the instrument vocabulary of data.instrument_label='family' on NSynth

config = load_config('large')
shapes = config_lib.derive(config)
mesh = partitioning.make_mesh(config)
rules = partitioning.logical_rules(config)
bsh = partitioning.batch_sharding(mesh)

def sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=bsh)

def describe(stage, task, batch):
  tc = config[stage].train
  config_lib.validate_batch(config, stage, jax.device_count(), jax.process_count())
  tx, _ = engine.make_optimizer(tc, task)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shard = engine.state_shardings(task, tx, tc, mesh, rules, jax.random.PRNGKey(0),
                                             batch)
  def leaves(tree, stree):
    out = []
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, x), s in zip(flat, jax.tree.leaves(stree)):
      local = s.shard_shape(x.shape)
      out.append({'path': jax.tree_util.keystr(path), 'shape': list(x.shape),
                  'spec': [list(e) if isinstance(e, tuple) else e for e in s.spec],
                  'bytes': math.prod(x.shape) * x.dtype.itemsize,
                  'device_bytes': math.prod(local) * x.dtype.itemsize})
    return out
  state = {'params': leaves(abstract.params, shard.params),
           'opt_state': leaves(abstract.opt_state, shard.opt_state)}
  if abstract.ema_params is not None:
    state['ema'] = leaves(abstract.ema_params, shard.ema_params)
  if abstract.extra_state is not None:
    state['extra'] = leaves(abstract.extra_state, shard.extra_state)
  return state

out = {'mesh': dict(mesh.shape), 'budget_gib': float(config.mesh.memory_budget_gib)}
tb = config.tokenizer.train.batch_size
task, tok_model = tokenizer.make_task(config, shapes)
out['tokenizer'] = describe('tokenizer', task, {'image': sds((tb,) + shapes.image, jnp.float32)})
from mars_jax.stages import autoregressor as ar_stage
task, _ = ar_stage.make_task(config, shapes, NSYNTH_FAMILIES, tok_model)   # init needs no tokenizer
ab = config.autoregressor.train.batch_size
out['autoregressor'] = describe('autoregressor', task, {
    'image': sds((ab,) + shapes.image, jnp.float32), 'pitch': sds((ab,), jnp.int32),
    'instrument': sds((ab,), jnp.int32)})
print('PROBE' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def probe():
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, '-c', _PROBE, ROOT], env=env, capture_output=True,
                     text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-4000:]
  line = [ln for ln in r.stdout.splitlines() if ln.startswith('PROBE')][-1]
  return json.loads(line[len('PROBE'):])


def _gib(n):
  return n / 2**30


def _axes(spec):
  out = set()
  for e in spec:
    out.update(e if isinstance(e, list) else [e] if e else [])
  return out


def test_mesh_is_data_by_fsdp(probe):
  assert probe['mesh'] == {'data': 8, 'fsdp': 8, 'tensor': 1}


@pytest.mark.parametrize('stage', ['tokenizer', 'autoregressor'])
def test_nothing_large_is_replicated(probe, stage):
  big = [p for p in probe[stage]['params'] if p['bytes'] // 4 >= LARGE]
  assert big, 'expected some large parameters in configs/large.py'
  replicated = [(p['path'], p['shape']) for p in big if not _axes(p['spec'])]
  assert not replicated, f'{stage}: large parameters fully replicated: {replicated}'
  for p in big:   # fsdp splits them 8 ways
    assert p['device_bytes'] * 8 <= p['bytes'], p


def test_var_matrices_follow_the_rules(probe):
  params = {p['path']: p for p in probe['autoregressor']['params']}
  blocks = [p for k, p in params.items() if 'blocks' in k and p['bytes'] // 4 >= LARGE]
  assert len(blocks) == 5, blocks   # ada, qkv, proj, fc1, fc2 (biases are small, replicated)
  for p in blocks:   # leading layer axis (nn.scan) is never sharded; 'embed' -> fsdp
    assert p['spec'][0] is None, p
    assert 'fsdp' in _axes(p['spec']), p
  # qkv (layers, embed, 3, heads, head_dim): embed on fsdp.
  qkv = next(p for k, p in params.items() if k.endswith("['qkv']"))
  assert qkv['spec'][1] == 'fsdp', qkv
  # The output head: (embed, vocab) with embed on fsdp, vocab on tensor (size 1 here).
  head = next(p for k, p in params.items() if "['head']" in k and k.endswith("['kernel']"))
  assert head['spec'][0] == 'fsdp', head


def test_tokenizer_convs_follow_the_rules(probe):
  params = probe['tokenizer']['params']
  convs = [p for p in params if len(p['shape']) == 4 and p['shape'][-1] % 8 == 0
           and p['shape'][-1] >= 64]
  assert convs
  sharded = [p for p in convs if p['spec'] and p['spec'][-1] == 'fsdp']
  assert len(sharded) >= len(convs) // 2, [(p['path'], p['spec']) for p in convs]


@pytest.mark.parametrize('stage', ['tokenizer', 'autoregressor'])
def test_adam_moments_shard_like_params(probe, stage):
  s = probe[stage]
  param_specs = {tuple(p['shape']): p['spec'] for p in s['params'] if p['bytes'] // 4 >= LARGE}
  moments = [o for o in s['opt_state'] if tuple(o['shape']) in param_specs]
  assert moments
  for o in moments:
    assert o['spec'] == param_specs[tuple(o['shape'])], o


@pytest.mark.parametrize('stage', ['tokenizer', 'autoregressor'])
def test_train_state_fits_the_budget(probe, stage):
  s = probe[stage]
  per_device = sum(x['device_bytes'] for part in s.values() for x in part)
  total = sum(x['bytes'] for part in s.values() for x in part)
  n_params = sum(x['bytes'] for x in s['params']) // 4
  print(f'\n{stage}: {n_params / 1e6:.1f} M params; train state {_gib(total):.2f} GiB in all, '
        f'{_gib(per_device):.3f} GiB per device (budget {probe["budget_gib"]} GiB)')
  assert _gib(per_device) <= probe['budget_gib'], (stage, _gib(per_device))
  assert per_device < total / 4, 'the train state is not spread over the mesh'
