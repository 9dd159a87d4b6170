"""`tokenizer` stage: trains the multi-scale VQ tokenizer on prepared CMX images."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.audio import cmx as cmx_lib
from mars_jax.evaluate import ceilings, images
from mars_jax.models import quantizer as quant_lib
from mars_jax.models.tokenizer import (adaptive_gan_weight, hinge_d_loss, hinge_g_loss,
                                       reconstruction_loss, tokenizer_loss)
from mars_jax.train import engine

NAME = 'tokenizer'
RESEED_EVERY = 50  # steps over which a code must go unused to count as dead
PITCH_EVAL_NOTES = 32  # held-out notes whose round-trip pitch (pyin) is logged at each eval
EVAL_SHOWN = 4         # of them, the first few written as pictures and audio at each eval
# The decoder's last layer, where VQGAN's adaptive GAN weight compares gradient norms.
LAST_LAYER = ('decoder', 'conv_out', 'Conv_0', 'kernel')


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def make_task(config, shapes=None):
  """The tokenizer as an engine Task; dead-code re-seeding is a non-gradient after_step.

  With tokenizer.gan_weight > 0 the params are {'tokenizer': ..., 'discriminator': ...} and the one
  loss is  rec + vq + [step >= gan_start] * (lambda * g_loss + d_loss), where the discriminator sees
  sg(recon) in d_loss and the generator sees sg(discriminator params) in g_loss, so one backward
  pass (one optimizer) trains both; lambda = gan_weight * VQGAN's adaptive weight (stop-gradient).
  """
  shapes = shapes or config_lib.derive(config)
  model = trained.build_tokenizer(config, shapes)
  tcfg = config.tokenizer
  gan = trained.gan_enabled(config)
  disc = trained.build_discriminator(config, shapes) if gan else None
  tok = functools.partial(trained.tokenizer_params, config)
  init = trained.tokenizer_init(config, model, disc)

  def plain_loss(params, batch, rng, step, frozen):
    recon, aux = model.apply({'params': params}, batch['image'], train=True,
                             rngs={'dropout': rng})
    value, metrics = tokenizer_loss(recon, batch['image'], aux, tcfg)
    return engine.Loss(value, metrics, {'counts': aux['code_counts'].sum(0),
                                        'pool': aux['residuals']})

  def gan_loss(params, batch, rng, step, frozen):
    t_params, d_params = params['tokenizer'], params['discriminator']
    x = batch['image'].astype(jnp.float32)

    def forward(last):  # the decoder's last kernel as an explicit input: its grads are one VJP
      return model.apply({'params': _set(t_params, LAST_LAYER, last)}, batch['image'],
                         train=True, rngs={'dropout': rng})

    recon, last_vjp, aux = jax.vjp(forward, _get(t_params, LAST_LAYER), has_aux=True)
    recon = recon.astype(jnp.float32)
    value, metrics = tokenizer_loss(recon, x, aux, tcfg)

    def rec_fn(r):  # the reconstruction part of tokenizer_loss (VQGAN's nll_loss)
      return reconstruction_loss(r, x, tcfg)[0]

    frozen_d = jax.lax.stop_gradient(d_params)

    def g_fn(r):  # generator hinge term; the discriminator is a constant here
      return hinge_g_loss(disc.apply({'params': frozen_d}, r))

    rec_loss, d_rec = jax.value_and_grad(rec_fn)(recon)
    g_loss, d_gan = jax.value_and_grad(g_fn)(recon)
    (rec_last,) = last_vjp(jax.lax.stop_gradient(d_rec))
    (gan_last,) = last_vjp(jax.lax.stop_gradient(d_gan))
    lam = adaptive_gan_weight(jnp.linalg.norm(rec_last.astype(jnp.float32)),
                              jnp.linalg.norm(gan_last.astype(jnp.float32))) * tcfg.gan_weight
    lam = jax.lax.stop_gradient(lam)

    # Discriminator on real and sg(fake) in one call: no gradient reaches the tokenizer.
    n = x.shape[0]
    logits = disc.apply({'params': d_params},
                        jnp.concatenate([x, jax.lax.stop_gradient(recon)], axis=0))
    logits_real, logits_fake = logits[:n], logits[n:]
    d_loss = hinge_d_loss(logits_real, logits_fake)

    active = jnp.asarray(step) >= tcfg.gan_start
    total = value + jnp.where(active, lam * g_loss + d_loss, 0.0)
    metrics = dict(metrics, rec_loss=rec_loss, gan_g=g_loss, gan_d=d_loss,
                   gan_weight_adaptive=lam, gan_active=active.astype(jnp.float32),
                   logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    metrics['loss'] = total
    return engine.Loss(total, metrics, {'counts': aux['code_counts'].sum(0),
                                        'pool': aux['residuals']})

  def init_extra(rng, params):
    return {'counts': jnp.zeros((tcfg.codebook_size,), jnp.float32),
            'since': jnp.zeros((), jnp.int32)}

  def after_step(params, extra, aux, rng):
    counts = extra['counts'] + aux['counts']
    since = extra['since'] + 1
    due = since >= RESEED_EVERY
    t_params = tok(params)
    codebook = t_params['quantizer']['codebook']
    reseeded = quant_lib.reseed_dead_codes(codebook, counts, aux['pool'], rng)
    t_params = {**t_params, 'quantizer': {**t_params['quantizer'],
                                          'codebook': jnp.where(due, reseeded, codebook)}}
    params = {**params, 'tokenizer': t_params} if gan else t_params
    return params, {'counts': jnp.where(due, 0.0, counts), 'since': jnp.where(due, 0, since)}

  def eval_fn(params, batch, frozen):
    recon, _ = model.apply({'params': tok(params)}, batch['image'])
    mask = batch['mask'].astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    err = recon - batch['image']
    return {'mse': jnp.sum(jnp.mean(err ** 2, axis=(1, 2, 3)) * mask) / n,
            'mae': jnp.sum(jnp.mean(jnp.abs(err), axis=(1, 2, 3)) * mask) / n}

  reseed = tcfg.dead_code_reseed
  return engine.Task(init=init, loss=gan_loss if gan else plain_loss, eval_fn=eval_fn,
                     init_extra=init_extra if reseed else None,
                     after_step=after_step if reseed else None,
                     cast_params=False), model


def is_complete(config, workdir):
  return workdir_lib.complete(config, workdir, NAME)


def _pitch_notes(config, workdir, n=PITCH_EVAL_NOTES):
  """A fixed set of up to n held-out (valid) notes, evenly spread over the split:
  (images (n, H, W, C), MIDI pitches (n,)). Read one record at a time, the same on every
  process (they go into the jit as one replicated input, whatever the process count)."""
  from mars_jax.stages import evaluate   # its RealSplit reads single records; no import cycle
  split = evaluate.RealSplit(config, workdir, 'valid')
  js = np.unique(np.linspace(0, len(split) - 1, min(n, len(split))).round().astype(int))
  recs = [split.record(int(j)) for j in js]
  specs = np.stack([r['spec'] for r in recs]) if recs else np.zeros((0, 1, 1), np.float32)
  return cmx_lib.to_image(specs, config.cmx), np.array([int(r['pitch']) for r in recs])


def make_on_eval(config, model, shapes, notes, shown=EVAL_SHOWN):
  """(params, step, stage_dir) -> {recon_pitch_*, gl_pitch_*}, run at every eval.

  The tokenizer's round trip of `notes` (encode -> tokens -> decode -> Griffin-Lim, one jit),
  scored by librosa.pyin as the evaluate stage scores it, next to Griffin-Lim of the true
  spectrograms (computed at the first call only: it does not change while the tokenizer trains).
  The first `shown` notes' spectrograms (original, reconstructed) and reconstructed audio go to
  <stage_dir>/eval/step_N/: the same round trip, so nothing is decoded twice."""
  image, midi = notes
  if not len(midi):
    return lambda params, step, stage_dir: {}
  spec_cfg = config.spectrogram
  fns = {g: jax.jit(ceilings.round_trip_fn(model, config, shapes, with_gl=g))
         for g in (False, True)}
  originals = cmx_lib.from_image(np.asarray(image[:shown]), config.cmx, shapes.freq_bins,
                                 shapes.frames)
  gl, calls = {}, []
  keep = ('pitch_exact', 'pitch_within_semitone')

  def on_eval(params, step, stage_dir):
    # Every process runs the same program (with Griffin-Lim of the true notes the first time).
    outs = jax.device_get(fns[not calls](params, jnp.asarray(image)))
    calls.append(step)
    if jax.process_index() != 0:
      return {}
    if not gl:
      gl.update(ceilings.pitch_scores(outs['gl_wave'], spec_cfg.sample_rate, midi, 'gl_'))
    rt = ceilings.pitch_scores(outs['recon_wave'], spec_cfg.sample_rate, midi, 'recon_')
    out = fs.makedirs(fs.join(stage_dir, 'eval', f'step_{step:07d}'))
    for i in range(len(originals)):
      fs.write_bytes(out / f'{i}_original.png', images.spectrogram_png(originals[i], spec_cfg))
      fs.write_bytes(out / f'{i}_reconstructed.png',
                     images.spectrogram_png(outs['recon_spec'][i], spec_cfg))
      fs.write_bytes(out / f'{i}_reconstructed.wav',
                     fs.wav_bytes(outs['recon_wave'][i], spec_cfg.sample_rate))
    return {f'{p}{k}': float(d[f'{p}{k}']) for p, d in (('recon_', rt), ('gl_', gl)) for k in keep}

  return on_eval


def run(config, workdir):
  shapes = config_lib.derive(config)
  stage_dir = workdir_lib.stage_dir(workdir, NAME)
  fp = workdir_lib.fingerprint(config, NAME)
  workdir_lib.claim(stage_dir, fp, NAME)
  task, model = make_task(config, shapes)
  on_eval = make_on_eval(config, model, shapes, _pitch_notes(config, workdir))
  task = dataclasses.replace(
      task, on_eval=lambda p, step, d: on_eval(trained.tokenizer_params(config, p), step, d))
  trained.train(task, config, NAME, stage_dir, workdir, fp)
