"""VAR autoregressor and sampler: KV cache == full forward, block-causal mask, CFG, seeds,
learning, sharding. The quantizer is faked (random codebook + resizes) to stay independent of
it. One small model is shared so the whole file compiles only a handful of programs."""
import functools
import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mars_jax import config as config_lib
from mars_jax.models import autoregressor as ar
from mars_jax.models import sampling

V, D, SCALES, SIDE = 64, 8, (1, 2, 4), 4
L = sum(p * p for p in SCALES)
B = 8
MODEL = ar.VAR(vocab_size=V, code_dim=D, scales=SCALES, num_pitches=8, num_instruments=2,
               depth=2, width=64, heads=2, label_dropout=0.1)
PITCH = jnp.asarray(np.arange(B) % 8, jnp.int32)
INST = jnp.asarray(np.arange(B) // 4 % 2, jnp.int32)
_init = jax.jit(MODEL.init)
_fwd = jax.jit(lambda v, p, i, t: MODEL.apply(v, p, i, t))


def _load_config(name):
  spec = importlib.util.spec_from_file_location(
      f'cfg_{name}', pathlib.Path(__file__).resolve().parents[1] / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _fresh_params():
  return nn.unbox(_init(jax.random.key(0), PITCH, INST, jnp.zeros((B, L - 1, D)))['params'])


@pytest.fixture(scope='module')
def params():
  """Perturbed parameters: at init the AdaLN gates are ~0, which would make attention invisible."""
  rng = np.random.default_rng(1)
  noisy = jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape), jnp.float32),
      _fresh_params())
  return {'params': noisy}


def fake_next_input_fn(codebook):
  """Quantizer stand-in: f_hat += nearest-upsampled codes; next input = f_hat resized down."""
  def step(k, f_hat, tokens):
    b, d = f_hat.shape[0], f_hat.shape[-1]
    codes = codebook[tokens]                                          # (B, p, p, d)
    f_hat = f_hat + jax.image.resize(codes, (b, SIDE, SIDE, d), 'nearest')
    if k + 1 == len(SCALES):
      return f_hat, None
    p = SCALES[k + 1]
    return f_hat, jax.image.resize(f_hat, (b, p, p, d), 'linear').reshape(b, p * p, d)
  return step


def _samplers():
  codebook = jax.random.normal(jax.random.key(7), (V, D))
  kw = dict(next_input_fn=fake_next_input_fn(codebook), latent_shape=(SIDE, SIDE, D))
  cached = jax.jit(functools.partial(sampling.sample_tokens, MODEL, **kw),
                   static_argnames=('guidance', 'top_k', 'top_p'))
  nocache = jax.jit(functools.partial(sampling.sample_tokens_nocache, MODEL, **kw),
                    static_argnames=('top_k', 'top_p'))
  return cached, nocache


@pytest.mark.slow
def test_kv_cache_sampling_cfg_and_seeds(params):
  cached, nocache = _samplers()
  pitch, inst, seeds = PITCH[:4], INST[:4], jnp.array([0, 1, 2, 3])
  key = jax.random.key(3)
  kw = dict(cfg=2.0, top_k=20, top_p=0.9)
  toks, f_hat = cached(params, pitch, inst, seeds, key, **kw)
  ref, f_ref = nocache(params, pitch, inst, seeds, key, **kw)
  assert [t.shape for t in toks] == [(4, p, p) for p in SCALES]
  assert all(t.dtype == jnp.int32 for t in toks)
  for t, r in zip(toks, ref):                       # cache == full block-causal forward
    np.testing.assert_array_equal(np.asarray(t), np.asarray(r))
  np.testing.assert_allclose(f_hat, f_ref, atol=1e-5)
  assert f_hat.shape == (4, SIDE, SIDE, D)
  assert len(np.unique(np.asarray(toks[-1]))) > 4   # not collapsed to one token

  # A sample depends on its own seed only, not on its batch neighbours; other seeds differ.
  rev, _ = cached(params, pitch[::-1], inst[::-1], seeds[::-1], key, **kw)
  for t, r in zip(toks, rev):
    np.testing.assert_array_equal(np.asarray(t), np.asarray(r)[::-1])
  other, _ = cached(params, pitch, inst, seeds + 100, key, **kw)
  assert not np.array_equal(np.asarray(toks[-1]), np.asarray(other[-1]))

  # Guidance 0 equals purely conditional sampling (no NULL rows); guidance > 0 changes samples.
  g0, _ = cached(params, pitch, inst, seeds, key, cfg=0.0, top_k=20, top_p=0.9)
  cond, _ = cached(params, pitch, inst, seeds, key, cfg=0.0, top_k=20, top_p=0.9,
                   guidance=False)
  for a, c in zip(g0, cond):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  assert not np.array_equal(np.asarray(g0[-1]), np.asarray(toks[-1]))


@pytest.mark.slow
def test_fused_attention_is_the_same_function(params):
  """autoregressor.attention='xla' (jax.nn.dot_product_attention) == the einsum path: logits,
  gradients, and the sampler's draws through the KV cache."""
  fused = MODEL.clone(attention='xla')
  teacher = jnp.asarray(np.random.default_rng(5).standard_normal((B, L - 1, D)), jnp.float32)
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(m.apply({'params': p}, PITCH, INST, teacher) ** 2)))
  (l_ref, g_ref), (l_fused, g_fused) = loss(MODEL)(params['params']), loss(fused)(params['params'])
  np.testing.assert_allclose(l_fused, l_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_fused, g_ref)
  codebook = jax.random.normal(jax.random.key(7), (V, D))
  kw = dict(next_input_fn=fake_next_input_fn(codebook), latent_shape=(SIDE, SIDE, D),
            cfg=2.0, top_k=20, top_p=0.9)
  args = (params, PITCH[:4], INST[:4], jnp.arange(4), jax.random.key(3))
  ref, _ = jax.jit(functools.partial(sampling.sample_tokens, MODEL, **kw))(*args)
  got, _ = jax.jit(functools.partial(sampling.sample_tokens, fused, **kw))(*args)
  for t, r in zip(got, ref):
    np.testing.assert_array_equal(np.asarray(t), np.asarray(r))


def _sorted_filter(logits, top_k, top_p):
  """The filter as first written (sort the whole vocabulary): the fast one must equal it."""
  v = logits.shape[-1]
  srt = -jnp.sort(-logits, axis=-1)
  idx = jnp.arange(v)
  k = v if (top_k <= 0 or top_k > v) else top_k
  in_k = idx < k
  probs = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = in_k & ((before < top_p) | (top_p >= 1.0) | (top_p <= 0.0) | (idx == 0))
  cut = jnp.take_along_axis(srt, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)
  return jnp.where(logits >= cut, logits, -jnp.inf)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  keep = lambda k, p: np.isfinite(np.asarray(sampling.filter_logits(logits, k, p)))[0]
  np.testing.assert_array_equal(keep(0, 1.0), [1, 1, 1, 1])   # both filters off
  np.testing.assert_array_equal(keep(2, 1.0), [1, 0, 1, 0])
  np.testing.assert_array_equal(keep(0, 0.7), [1, 0, 1, 0])   # 0.5 < 0.7 <= 0.8
  np.testing.assert_array_equal(keep(0, 0.5), [1, 0, 0, 0])
  np.testing.assert_array_equal(keep(3, 0.9), [1, 0, 1, 1])   # nucleus of the top-3
  np.testing.assert_array_equal(keep(1, 1.0), [1, 0, 0, 0])   # best token always kept
  np.testing.assert_array_equal(keep(0, 0.0), [1, 1, 1, 1])   # top_p <= 0: no nucleus (VAR)
  np.testing.assert_array_equal(keep(2, -1.0), [1, 0, 1, 0])
  assert sampling.filter_logits(logits, 0, 1.0) is logits     # the no-filter path is static
  # top-k slice + nucleus == the full sort, on random logits with ties, for many settings.
  rng = np.random.default_rng(0)
  big = jnp.asarray(np.round(rng.standard_normal((3, 5, 257)) * 4) / 4, jnp.float32)
  for k, p in [(0, 0.9), (1, 0.5), (20, 1.0), (20, 0.5), (300, 0.96), (257, 0.3), (7, 0.0)]:
    np.testing.assert_array_equal(np.asarray(sampling.filter_logits(big, k, p)),
                                  np.asarray(_sorted_filter(big, k, p)), err_msg=f'{k} {p}')
  assert sampling.guidance_weight(3.0, 0, 4) == 0.0
  assert sampling.guidance_weight(3.0, 3, 4) == 3.0


def test_block_causal_mask(params):
  teacher = jnp.asarray(np.random.default_rng(4).standard_normal((B, L - 1, D)), jnp.float32)
  base = np.asarray(_fwd(params, PITCH, INST, teacher))
  assert base.shape == (B, L, V)
  for k, (start, end) in enumerate(ar.scale_bounds(SCALES)):
    if k == 0:
      continue
    # Perturbing scales >= k leaves every earlier logit bit-identical.
    out = np.asarray(_fwd(params, PITCH, INST, teacher.at[:, start - 1:].add(1.0)))
    np.testing.assert_array_equal(out[:, :start], base[:, :start])
    # One input of scale k moves the logits of scale k.
    out = np.asarray(_fwd(params, PITCH, INST, teacher.at[:, start - 1, 0].add(1.0)))
    np.testing.assert_array_equal(out[:, :start], base[:, :start])
    assert np.abs(out[:, start:end] - base[:, start:end]).max() > 1e-3
  # The condition reaches the first scale.
  other = np.asarray(_fwd(params, (PITCH + 1) % 8, INST, teacher))
  assert np.abs(other[:, 0] - base[:, 0]).max() > 1e-3


def test_grouped_attention_equals_the_masked_one():
  # At base's scales the einsum path attends query groups to their key prefixes instead of
  # masking the full (L, L) scores: the same outputs and gradients as the masked computation.
  scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  n = sum(p * p for p in scales)
  groups = ar.query_groups(scales)
  assert len(groups) > 1 and groups[0][0] == 0 and groups[-1][1] == n
  for (_, end, keys), (start, _, _) in zip(groups, groups[1:]):
    assert end == keys == start           # contiguous, each group sees exactly its prefix
  bounds = {b for _, b in ar.scale_bounds(scales)}
  assert all(end in bounds for _, end, _ in groups)   # groups never split a scale
  grouped = ar.Attention(32, 2, 1, scales=scales)
  masked = ar.Attention(32, 2, 1)                     # no scales: the full masked scores
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, n, 32)), jnp.float32)
  mask = jnp.asarray(ar.block_causal_mask(scales))
  params = grouped.init(jax.random.key(1), x, None, mask, 0)

  def run(module):
    def f(p, x):
      out, _ = module.apply(p, x, None, mask, 0)
      return jnp.sum(jnp.sin(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
    return out, grads

  out_g, grads_g = run(grouped)
  out_m, grads_m = run(masked)
  np.testing.assert_allclose(out_g, out_m, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_m)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_reduces_loss():
  rng = np.random.default_rng(0)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  teacher = jnp.asarray(rng.standard_normal((B, L - 1, D)), jnp.float32)
  p0 = _fresh_params()
  opt = optax.chain(
      optax.clip_by_global_norm(2.0),
      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 300, 3e-4),
                  b1=0.9, b2=0.95, weight_decay=0.05,
                  mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)))

  def loss_fn(p, key):
    logits = MODEL.apply({'params': p}, PITCH, INST, teacher, train=True, rngs={'dropout': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(p, s, key):
    loss, g = jax.value_and_grad(loss_fn)(p, key)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  p, s = p0, opt.init(p0)
  losses = []
  for i in range(301):
    p, s, loss = step(p, s, jax.random.key(i))
    losses.append(loss)
  first, last = float(losses[0]), float(losses[-1])
  assert abs(first - math.log(V)) < 0.05, first    # gated residuals: starts at uniform
  assert last < 0.5 * math.log(V), (first, last)


def test_from_config():
  cfg = _load_config('tiny')
  shapes = config_lib.derive(cfg)
  m = ar.from_config(cfg, shapes, num_instruments=4)
  # 0 means VAR's rule: width 64*depth, heads = depth; tiny sets both explicitly.
  cfg_default = _load_config('tiny')
  cfg_default.autoregressor.width = cfg_default.autoregressor.heads = 0
  d = ar.from_config(cfg_default, shapes, num_instruments=4)
  assert (d.width, d.heads) == (64 * d.depth, d.depth)
  assert (m.width, m.heads, m.depth, m.vocab_size, m.code_dim) == (128, 4, 3, 256, 16)
  assert m.num_tokens == shapes.num_tokens == 85 and m.scales == (1, 2, 4, 8)
  z = jnp.zeros((2,), jnp.int32)
  abstract = jax.eval_shape(m.init, jax.random.key(0), z, z, jnp.zeros((2, 84, 16)))
  names = nn.get_partition_spec(abstract)['params']
  assert names['blocks']['attn']['qkv'] == jax.sharding.PartitionSpec(
      None, 'embed', None, 'heads', None)
  assert names['head']['kernel'] == jax.sharding.PartitionSpec('embed', 'vocab')
  assert abstract['params']['pitch_embed'].value.shape == (shapes.num_pitches + 1, 128)
  assert ar.init_cache(m, 3)['k'].shape == (3, 3, 4, 85, 32)
  # attention 'auto': the fused cuDNN kernel only on a GPU in 16-bit, else the einsum path.
  assert m.attention == ('cudnn' if jax.default_backend() == 'gpu' and m.dtype != jnp.float32
                         else 'einsum')
  cfg.autoregressor.attention = 'xla'
  assert ar.from_config(cfg, shapes, num_instruments=4).attention == 'xla'


@pytest.mark.slow
def test_sharded_forward_matches(params):
  assert len(jax.devices()) >= 8
  rules = tuple(_load_config('tiny').mesh.rules)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  teacher = jnp.asarray(np.random.default_rng(5).standard_normal((B, L - 1, D)), jnp.float32)
  ref = np.asarray(_fwd(params, PITCH, INST, teacher))

  abstract = jax.eval_shape(MODEL.init, jax.random.key(0), PITCH, INST, teacher)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  assert shardings['params']['blocks']['attn']['qkv'].spec == jax.sharding.PartitionSpec(
      None, 'fsdp', None, 'tensor', None)
  sharded = jax.device_put(params, shardings)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  args = [jax.device_put(x, data) for x in (PITCH, INST, teacher)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda v, p, i, t: MODEL.apply(v, p, i, t))(sharded, *args)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
