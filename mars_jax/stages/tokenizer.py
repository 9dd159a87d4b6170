"""`tokenizer` stage: trains the multi-scale VQ tokenizer on prepared CMX images."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mars_jax import config as config_lib
from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import griffin_lim
from mars_jax.data import pipeline
from mars_jax.evaluate import images
from mars_jax.models import quantizer as quant_lib
from mars_jax.models.tokenizer import Tokenizer, tokenizer_loss
from mars_jax.stages import common
from mars_jax.train import checkpoint, engine, partitioning

NAME = 'tokenizer'
RESEED_EVERY = 50  # steps over which a code must go unused to count as dead


def build_model(config, shapes=None):
  shapes = shapes or config_lib.derive(config)
  dtype = jnp.bfloat16 if config.tokenizer.train.compute_dtype == 'bfloat16' else jnp.float32
  return Tokenizer.from_config(config.tokenizer, shapes, dtype=dtype)


def make_task(config, shapes=None):
  """The tokenizer as an engine Task; dead-code re-seeding is a non-gradient after_step."""
  shapes = shapes or config_lib.derive(config)
  model = build_model(config, shapes)
  tcfg = config.tokenizer

  def init(rng, batch):
    return model.init({'params': rng, 'dropout': rng}, batch['image'])['params']

  def loss(params, batch, rng, step):
    recon, aux = model.apply({'params': params}, batch['image'], train=True,
                             rngs={'dropout': rng})
    value, metrics = tokenizer_loss(recon, batch['image'], aux, tcfg)
    return value, metrics, {'counts': aux['code_counts'].sum(0), 'pool': aux['residuals']}

  def init_extra(rng, params):
    return {'counts': jnp.zeros((tcfg.codebook_size,), jnp.float32),
            'since': jnp.zeros((), jnp.int32)}

  def after_step(params, extra, aux, rng):
    counts = extra['counts'] + aux['counts']
    since = extra['since'] + 1
    due = since >= RESEED_EVERY
    codebook = params['quantizer']['codebook']
    reseeded = quant_lib.reseed_dead_codes(codebook, counts, aux['pool'], rng)
    params = {**params, 'quantizer': {**params['quantizer'],
                                      'codebook': jnp.where(due, reseeded, codebook)}}
    return params, {'counts': jnp.where(due, 0.0, counts), 'since': jnp.where(due, 0, since)}

  def eval_fn(params, batch):
    recon, _ = model.apply({'params': params}, batch['image'])
    mask = batch['mask'].astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    err = recon - batch['image']
    return {'mse': jnp.sum(jnp.mean(err ** 2, axis=(1, 2, 3)) * mask) / n,
            'mae': jnp.sum(jnp.mean(jnp.abs(err), axis=(1, 2, 3)) * mask) / n}

  reseed = tcfg.dead_code_reseed
  return engine.Task(init=init, loss=loss, eval_fn=eval_fn,
                     init_extra=init_extra if reseed else None,
                     after_step=after_step if reseed else None,
                     cast_params=False), model


def _stage_dir(workdir):
  return os.path.join(workdir, NAME)


def fingerprint(config):
  return common.stage_fingerprint(config, 'tokenizer')


def is_complete(config, workdir):
  return common.is_complete(_stage_dir(workdir), fingerprint(config))


def _eval_examples(config, workdir, n=4):
  """A fixed handful of held-out examples for the images/audio written at each eval."""
  it = pipeline.eval_batches(config, common.data_dir(workdir), 'valid', batch_size=n,
                             max_examples=n)
  return next(iter(it))


def make_on_eval(config, model, shapes, examples):
  spec_cfg = config.spectrogram
  recon_fn = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])

  def on_eval(params, step, stage_dir):
    recon = np.asarray(jax.device_get(recon_fn(params, jnp.asarray(examples['image']))))
    if jax.process_index() != 0:
      return
    out = os.path.join(stage_dir, 'eval', f'step_{step:07d}')
    os.makedirs(out, exist_ok=True)
    to_spec = functools.partial(cmx_lib.from_image, cmx_cfg=config.cmx, freq=shapes.freq_bins,
                                frames=shapes.frames)
    originals = to_spec(np.asarray(examples['image']))
    recons = np.clip(to_spec(recon), -1.0, 1.0)
    waves = np.asarray(griffin_lim.to_audio(jnp.asarray(recons), spec_cfg))
    import soundfile as sf
    for i in range(len(recons)):
      images.spectrogram_png(originals[i], os.path.join(out, f'{i}_original.png'))
      images.spectrogram_png(recons[i], os.path.join(out, f'{i}_reconstructed.png'))
      sf.write(os.path.join(out, f'{i}_reconstructed.wav'), np.clip(waves[i], -1, 1),
               spec_cfg.sample_rate, subtype='PCM_16')

  return on_eval


def run(config, workdir):
  shapes = config_lib.derive(config)
  stage_dir = _stage_dir(workdir)
  fp = fingerprint(config)
  common.claim(stage_dir, fp, NAME)
  data_dir = common.data_dir(workdir)
  tc = config.tokenizer.train
  task, model = make_task(config, shapes)
  examples = _eval_examples(config, workdir)
  task = engine.Task(**{**task.__dict__, 'on_eval': make_on_eval(config, model, shapes, examples)})
  eval_bs = max(tc.batch_size // jax.process_count(), 1) * jax.process_count()
  state = engine.train(
      task, config, NAME, stage_dir,
      train_iter_fn=lambda: pipeline.make_iterator(config, data_dir, 'train',
                                                   batch_size=tc.batch_size),
      eval_iter_fn=lambda: pipeline.eval_batches(config, data_dir, 'valid', batch_size=eval_bs))
  common.mark_complete(stage_dir, fp, step=int(jax.device_get(state.step)))


def load_params(config, workdir, mesh):
  """The trained tokenizer's params (EMA when kept), sharded on `mesh`, and the model."""
  shapes = config_lib.derive(config)
  task, model = make_task(config, shapes)
  rows = max(mesh.size // jax.process_count(), 1)  # any batch the mesh can split; shapes only
  sample = {'image': np.zeros((rows,) + shapes.image, np.float32)}
  target = engine.abstract_params(task, config, mesh, sample)
  params = checkpoint.restore_params(checkpoint.ckpt_dir(_stage_dir(workdir)), target)
  return params, model
