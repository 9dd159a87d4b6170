"""Tokenizer model: shapes for tiny/base (abstractly), dtypes, names, losses, a short overfit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from tests.helpers import load_config
from mars_jax.config import derive
from mars_jax.models import tokenizer as tk


def _abstract(model, x):
  """Abstract init + forward: shapes without compiling anything."""
  key = jax.random.key(0)
  variables = jax.eval_shape(model.init, key, x)
  return variables, jax.eval_shape(model.apply, variables, x)


def _check_shapes(config, batch=2):
  shapes = derive(config)
  model = tk.Tokenizer.from_config(config.tokenizer, shapes)
  x = jax.ShapeDtypeStruct((batch,) + tuple(shapes.image), jnp.float32)
  variables, (recon, aux) = _abstract(model, x)
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  assert [t.shape for t in aux['tokens']] == [(batch, p, p) for p in shapes.scales]
  tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method='encode_tokens'), variables, x)
  assert [t.shape for t in tokens] == [(batch, p, p) for p in shapes.scales]
  out = jax.eval_shape(lambda v, t: model.apply(v, t, method='decode_tokens'), variables, tokens)
  assert out.shape == x.shape
  h, w, d = shapes.latent
  f_hat = jax.eval_shape(lambda v, t: model.apply(v, t, method='idx_to_fhat'), variables, tokens)
  assert f_hat.shape == (batch, h, w, d)
  teacher = jax.eval_shape(lambda v, t: model.apply(v, t, method='idx_to_teacher_inputs'),
                           variables, tokens)
  assert teacher.shape == (batch, shapes.num_tokens - shapes.scales[0] ** 2, d)
  nxt = jax.eval_shape(lambda v, f, t: model.apply(v, 0, f, t, method='next_input'),
                       variables, f_hat, tokens[0])
  assert nxt[1].shape == (batch, shapes.scales[1] ** 2, d)
  assert variables['params']['quantizer']['codebook'].value.shape == (
      config.tokenizer.codebook_size, d)
  return variables


def test_shapes_tiny(tiny_config):
  variables = _check_shapes(tiny_config)
  # Every parameter carries logical axis names from the mesh rules.
  rules = {name for name, _ in tiny_config.mesh.rules}
  boxed = jax.tree.leaves(variables, is_leaf=lambda b: isinstance(b, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
  assert all(n is None or n in rules for b in boxed for n in b.names)
  spec = nn.get_partition_spec(variables)['params']
  assert tuple(spec['encoder']['conv_in']['Conv_0']['kernel']) == (None, None, 'conv_in',
                                                                   'conv_out')


def test_shapes_base():
  variables = _check_shapes(load_config('base'))
  n = sum(np.prod(b.value.shape) for b in jax.tree.leaves(
      variables, is_leaf=lambda b: isinstance(b, nn.Partitioned)))
  assert 5e6 < n < 2e8  # a VAR-sized conv tokenizer, not a toy or a typo


def test_bfloat16_compute_float32_params(tiny_config):
  shapes = derive(tiny_config)
  model = tk.Tokenizer.from_config(tiny_config.tokenizer, shapes, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2,) + tuple(shapes.image), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
  (recon, aux), inter = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, x)
  assert recon.dtype == jnp.float32 and aux['f_hat'].dtype == jnp.float32
  enc = inter['intermediates']['encoder']
  assert enc['conv_in']['__call__'][0].dtype == jnp.bfloat16
  assert enc['down_0_block_0']['__call__'][0].dtype == jnp.bfloat16


def test_tokenizer_loss_terms():
  cfg = mlc.ConfigDict(dict(l1_weight=2.0, l2_weight=3.0, vq_weight=0.5))
  x = jnp.zeros((1, 2, 2, 1))
  recon = jnp.full((1, 2, 2, 1), 0.5)
  aux = dict(vq_loss=jnp.float32(0.2), usage=jnp.array([0.1, 0.2]),
             perplexity=jnp.array([1.0, 3.0]))
  loss, m = tk.tokenizer_loss(recon, x, aux, cfg)
  assert float(m['l1']) == 0.5 and float(m['l2']) == 0.25
  np.testing.assert_allclose(float(loss), 2 * 0.5 + 3 * 0.25 + 0.5 * 0.2, rtol=1e-6)
  assert float(m['usage_1']) == np.float32(0.2) and float(m['perplexity_1']) == 3.0


def test_level_weighted_reconstruction_loss():
  """level_weight a: each error counts 1 + a * (x + 1) / 2 (a weighted mean); 0 is the mean."""
  x = jnp.array([-1.0, 1.0]).reshape(1, 1, 2, 1)       # the floor and a full-scale bin
  recon = x + jnp.array([0.4, 0.2]).reshape(1, 1, 2, 1)
  plain = mlc.ConfigDict(dict(l1_weight=1.0, l2_weight=1.0, level_weight=0.0))
  rec, l1, l2 = tk.reconstruction_loss(recon, x, plain)
  np.testing.assert_allclose([float(l1), float(l2)], [0.3, 0.1], rtol=1e-6)
  weighted = mlc.ConfigDict(dict(l1_weight=1.0, l2_weight=2.0, level_weight=4.0))
  rec, l1, l2 = tk.reconstruction_loss(recon, x, weighted)   # weights 1 and 5
  np.testing.assert_allclose(float(l1), (0.4 + 5 * 0.2) / 6, rtol=1e-6)
  np.testing.assert_allclose(float(l2), (0.16 + 5 * 0.04) / 6, rtol=1e-6)
  np.testing.assert_allclose(float(rec), float(l1) + 2 * float(l2), rtol=1e-6)
  # The same error costs more on the loud bin than on the floor.
  on_floor = tk.reconstruction_loss(x.at[0, 0, 0, 0].add(0.3), x, weighted)[0]
  on_peak = tk.reconstruction_loss(x.at[0, 0, 1, 0].add(-0.3), x, weighted)[0]
  assert float(on_peak) > 4 * float(on_floor)


def test_gan_pieces():
  np.testing.assert_allclose(
      float(tk.hinge_d_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.5]))),
      0.5 * (0.5 + 0.75))
  assert float(tk.hinge_g_loss(jnp.array([1.0, 3.0]))) == -2.0
  assert float(tk.adaptive_gan_weight(jnp.float32(2.0), jnp.float32(0.5))) == np.float32(
      2.0 / (0.5 + 1e-4))
  assert float(tk.adaptive_gan_weight(jnp.float32(1.0), jnp.float32(0.0))) == 1e4
  d = tk.PatchDiscriminator(channels=32, num_layers=3, groups=8)
  x = jax.ShapeDtypeStruct((2, 32, 32, 16), jnp.float32)
  v = jax.eval_shape(d.init, jax.random.key(0), x)
  out = jax.eval_shape(d.apply, v, x)
  assert out.shape[0] == 2 and out.shape[-1] == 1 and out.shape[1] >= 2


@pytest.mark.slow
def test_overfit_few_examples():
  """A narrow tokenizer on tiny-shaped inputs (32x32x16 -> 8x8 latent) learns in 150 Adam steps."""
  cfg = mlc.ConfigDict(dict(l1_weight=1.0, l2_weight=1.0, vq_weight=1.0))
  model = tk.Tokenizer(image_channels=16, channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                       groups=2, latent_channels=8, codebook_size=32, scales=(1, 2, 4, 8),
                       num_phi=1)
  smooth = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  xs = jnp.clip(jax.image.resize(smooth, (2, 32, 32, 16), 'linear'), -1, 1)
  tx = optax.adam(3e-3)
  steps = 150

  def loss_fn(p):
    recon, aux = model.apply({'params': p}, xs, train=True)
    return tk.tokenizer_loss(recon, xs, aux, cfg)[0]

  @jax.jit
  def run(key):
    params = nn.unbox(model.init(key, xs))['params']

    def step(carry, _):
      p, o = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), loss

    _, losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return losses

  # unsafe_rbg (XLA's own generator) and LLVM -O1 halve the CPU compile time of this test.
  key = jax.random.key(1, impl='unsafe_rbg')
  compiled = run.lower(key).compile(compiler_options={'xla_backend_optimization_level': 1})
  losses = compiled(key)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  assert losses[-10:].mean() < 0.6 * losses[:3].mean(), (losses[:3], losses[-10:])
