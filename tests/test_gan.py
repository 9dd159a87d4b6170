"""The optional hinge-GAN in the tokenizer stage: one loss, one backward pass, separated gradients.

Uses the stage's Task functions directly under jax.jit on a very small tokenizer (no training).
Compile time dominates on CPU, so the tokenizer is cut down (two scales, 8 channels), params are
initialised with an 'unsafe_rbg' key (threefry init compiles ~6x slower) and the combined loss and
every reference gradient are computed in one jitted function, called at two steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax import trained
from mars_jax.models.tokenizer import hinge_d_loss, hinge_g_loss, tokenizer_loss
from mars_jax.stages import tokenizer as tok_stage
from mars_jax.train.partitioning import unbox
from tests.helpers import small_tiny_config

BATCH = 4
GAN_START = 5
GAN_WEIGHT = 0.8


def _config(gan_weight):
  return small_tiny_config(tokenizer__channels=8, tokenizer__groups=4,
                           tokenizer__latent_channels=8, tokenizer__codebook_size=32,
                           tokenizer__scales=(2, 8), tokenizer__num_phi=1,
                           tokenizer__disc_channels=8, tokenizer__gan_weight=gan_weight,
                           tokenizer__gan_start=GAN_START)


def _assert_trees_close(a, b, rtol=2e-4, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(float(np.abs(y).max()), 1e-12)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol + rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


def _total_abs(tree):
  return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def gan():
  """(config, shapes, task, model, params, batch, run) with the GAN on; run(params, step) gives
  the combined loss's value/metrics/grads and every reference, all from one compile."""
  config = _config(GAN_WEIGHT)
  shapes = config_lib.derive(config)
  task, model = tok_stage.make_task(config, shapes)
  disc = trained.build_discriminator(config, shapes)
  tcfg = config.tokenizer
  x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH,) + tuple(shapes.image)),
                  jnp.float32)
  batch = {'image': x}
  params = unbox(jax.jit(task.init)(jax.random.key(1, impl='unsafe_rbg'), batch))
  rng = jax.random.PRNGKey(2)

  def recon_of(t):
    return model.apply({'params': t}, x, train=True, rngs={'dropout': rng})

  def rec_fn(r):  # VQGAN's nll_loss, with tokenizer.level_weight's weighted mean written out
    w = 1.0 + tcfg.level_weight * (x + 1.0) / 2.0
    l1 = jnp.sum(w * jnp.abs(r - x)) / jnp.sum(w)
    l2 = jnp.sum(w * jnp.square(r - x)) / jnp.sum(w)
    return tcfg.l1_weight * l1 + tcfg.l2_weight * l2

  def plain_loss(t):
    recon, aux = recon_of(t)
    return tokenizer_loss(recon, x, aux, tcfg)[0]

  @jax.jit
  def run(params, step):
    t, d = params['tokenizer'], params['discriminator']
    (value, metrics), grads = jax.value_and_grad(
        lambda p: task.loss(p, batch, rng, step, {})[:2], has_aux=True)(params)
    lam = metrics['gan_weight_adaptive']

    # VQGAN's weight from grads of the full forward w.r.t. the decoder's last kernel.
    def with_last(last, fn):
      return fn(recon_of(tok_stage._set(t, tok_stage.LAST_LAYER, last))[0])
    last = tok_stage._get(t, tok_stage.LAST_LAYER)
    g_rec = jax.grad(with_last)(last, rec_fn)
    g_gan = jax.grad(with_last)(last, lambda r: hinge_g_loss(disc.apply({'params': d}, r)))
    lam_ref = GAN_WEIGHT * jnp.clip(jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + 1e-4),
                                    0.0, 1e4)

    # Generator: rec + vq + lam * g_loss with the discriminator held fixed (no d_loss leak).
    def gen_loss(t):
      recon, aux = recon_of(t)
      return (tokenizer_loss(recon, x, aux, tcfg)[0]
              + lam * hinge_g_loss(disc.apply({'params': d}, recon)))
    ref_tok = jax.grad(gen_loss)(t)

    # Discriminator: hinge_d_loss alone on real and the (fixed) reconstruction (no g_loss leak).
    recon = recon_of(t)[0]
    ref_disc = jax.grad(lambda d: hinge_d_loss(disc.apply({'params': d}, x),
                                               disc.apply({'params': d}, recon)))(d)
    plain_value, plain_tok = jax.value_and_grad(plain_loss)(t)
    return dict(value=value, metrics=metrics, grads=grads, lam_ref=lam_ref, ref_tok=ref_tok,
                ref_disc=ref_disc, plain_value=plain_value, plain_tok=plain_tok)

  return config, shapes, task, model, params, batch, run


@pytest.mark.slow
def test_gan_off_is_the_plain_tokenizer_loss(gan):
  on_config, shapes, _, _, on_params, batch, _ = gan
  config = _config(0.0)
  assert config_lib.derive(config) == shapes
  task, model = tok_stage.make_task(config, shapes)
  key = jax.random.key(1, impl='unsafe_rbg')
  abstract = unbox(jax.eval_shape(task.init, key, batch))
  assert 'discriminator' not in abstract and 'tokenizer' not in abstract
  # Same init as the tokenizer half of the GAN tree: old checkpoints keep their layout.
  assert jax.tree.structure(abstract) == jax.tree.structure(on_params['tokenizer'])
  params = on_params['tokenizer']
  assert trained.tokenizer_params(config, params) is params
  rng = jax.random.PRNGKey(2)

  @jax.jit
  def both(p):
    value, metrics, _ = task.loss(p, batch, rng, jnp.int32(100), {})
    recon, aux = model.apply({'params': p}, batch['image'], train=True, rngs={'dropout': rng})
    return value, metrics, tokenizer_loss(recon, batch['image'], aux, config.tokenizer)

  value, metrics, (ref_value, ref_metrics) = both(params)
  assert float(value) == float(ref_value)
  assert set(metrics) == set(ref_metrics)
  assert not any(k.startswith('gan') or k.startswith('logits') for k in metrics)


@pytest.mark.slow
def test_gan_params_tree_and_reseed(gan):
  config, shapes, task, model, params, batch, _ = gan
  assert set(params) == {'tokenizer', 'discriminator'}
  assert trained.tokenizer_params(config, params) is params['tokenizer']
  assert tok_stage._get(params['tokenizer'], tok_stage.LAST_LAYER).shape[-1] == shapes.image[-1]
  # Dead-code re-seeding addresses params['tokenizer']['quantizer']['codebook'].
  extra = task.init_extra(None, params)
  extra['since'] = jnp.int32(tok_stage.RESEED_EVERY - 1)
  dim = params['tokenizer']['quantizer']['codebook'].shape[-1]
  aux = {'counts': jnp.zeros_like(extra['counts']), 'pool': jnp.full((64, dim), 7.0, jnp.float32)}
  new, new_extra = jax.jit(task.after_step)(params, extra, aux, jax.random.PRNGKey(3))
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert np.allclose(np.asarray(new['tokenizer']['quantizer']['codebook']), 7.0, atol=1.0)
  assert int(new_extra['since']) == 0
  _assert_trees_close(new['discriminator'], params['discriminator'], rtol=0, atol=0)


@pytest.mark.slow
def test_gan_gradients_are_separated(gan):
  *_, params, _, run = gan
  out = jax.device_get(run(params, jnp.int32(GAN_START)))
  m = out['metrics']
  assert float(m['gan_active']) == 1.0
  for k in ('l1', 'l2', 'vq_loss', 'gan_g', 'gan_d', 'gan_weight_adaptive', 'logits_real',
            'logits_fake'):
    assert np.isfinite(float(m[k])), k
  lam = float(m['gan_weight_adaptive'])
  assert lam > 0
  np.testing.assert_allclose(lam, float(out['lam_ref']), rtol=1e-4)
  np.testing.assert_allclose(float(out['value']), float(out['plain_value']) + lam * float(
      m['gan_g']) + float(m['gan_d']), rtol=1e-5)
  assert _total_abs(out['ref_disc']) > 0
  _assert_trees_close(out['grads']['discriminator'], out['ref_disc'])
  _assert_trees_close(out['grads']['tokenizer'], out['ref_tok'])
  # ... and the GAN term really reaches the tokenizer: without it the decoder's grads differ.
  dec = lambda g: np.asarray(tok_stage._get(g, tok_stage.LAST_LAYER))
  assert not np.allclose(dec(out['plain_tok']), dec(out['grads']['tokenizer']), rtol=1e-3,
                         atol=1e-7)


@pytest.mark.slow
def test_gan_inactive_before_gan_start(gan):
  *_, params, _, run = gan
  out = jax.device_get(run(params, jnp.int32(GAN_START - 1)))
  assert float(out['metrics']['gan_active']) == 0.0
  np.testing.assert_allclose(float(out['value']), float(out['plain_value']), rtol=1e-6)
  assert _total_abs(out['grads']['discriminator']) == 0.0
  _assert_trees_close(out['grads']['tokenizer'], out['plain_tok'])
