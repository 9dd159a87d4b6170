"""The models a run trains, as a workdir holds them: how each is built and read back.

One place for the tokenizer, the autoregressor (VAR) and the evaluation classifiers: the model
built from the config, the `init` that fixes its params tree (the stages train with it), and
`train`, which trains one through the engine on the prepared data and marks its folder complete,
and `load_*`, which restores the final params (EMA when kept) from the workdir, sharded on a mesh.
Used by the stages, the Generator (mars_jax.sample), the evaluation and the benchmarks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mars_jax import config as config_lib
from mars_jax import workdir as workdir_lib
from mars_jax.data import pipeline
from mars_jax.models import autoregressor as ar
from mars_jax.models.classifier import Classifier
from mars_jax.models.tokenizer import PatchDiscriminator, Tokenizer
from mars_jax.train import checkpoint, engine


def compute_dtype(train_cfg):
  return jnp.bfloat16 if train_cfg.compute_dtype == 'bfloat16' else jnp.float32


# --- tokenizer -----------------------------------------------------------------------------------


def build_tokenizer(config, shapes=None):
  shapes = shapes or config_lib.derive(config)
  return Tokenizer.from_config(config.tokenizer, shapes,
                               dtype=compute_dtype(config.tokenizer.train))


def gan_enabled(config) -> bool:
  """tokenizer.gan_weight > 0 turns the hinge-GAN on (params become {'tokenizer',
  'discriminator'})."""
  return float(config.tokenizer.gan_weight) > 0


def build_discriminator(config, shapes=None):
  """The PatchGAN discriminator. Optional config keys: tokenizer.disc_channels (default 64, VQGAN's
  ndf) and tokenizer.disc_layers (default 0 = the most layers, up to VQGAN's 3, that still leave at
  least 2x2 logits on the CMX image)."""
  shapes = shapes or config_lib.derive(config)
  tcfg = config.tokenizer
  layers = int(tcfg.get('disc_layers', 0) or 0)
  if layers <= 0:
    side = min(shapes.image[0], shapes.image[1])
    layers = 3
    while layers > 1 and side // 2 ** layers - 2 < 2:
      layers -= 1
  return PatchDiscriminator(channels=int(tcfg.get('disc_channels', 64)), num_layers=layers,
                            dtype=compute_dtype(tcfg.train))


def tokenizer_params(config, params):
  """The tokenizer's own params out of the stage's params tree (which holds the discriminator
  too when the GAN is on)."""
  return params['tokenizer'] if gan_enabled(config) else params


def tokenizer_init(config, model, disc=None):
  """init(rng, batch) -> the tokenizer stage's params ({'tokenizer', 'discriminator'} with the
  GAN on)."""
  def init(rng, batch):
    params = model.init({'params': rng, 'dropout': rng}, batch['image'])['params']
    if not gan_enabled(config):
      return params
    d_params = disc.init(jax.random.fold_in(rng, 0xD15C), batch['image'])['params']
    return {'tokenizer': params, 'discriminator': d_params}
  return init


# --- autoregressor -------------------------------------------------------------------------------


def num_instruments(config, manifest):
  return len(manifest['vocab'][config.data.instrument_label])


def var_init(model, shapes):
  """init(rng, batch) -> the VAR's params (teacher inputs are zeros: only shapes matter)."""
  first = shapes.scales[0] ** 2

  def init(rng, batch):
    b = batch['pitch'].shape[0]
    teacher = jnp.zeros((b, shapes.num_tokens - first, shapes.latent[-1]), jnp.float32)
    return model.init({'params': rng}, batch['pitch'], batch['instrument'], teacher)['params']
  return init


# --- classifiers ---------------------------------------------------------------------------------


def classifier_classes(config, workdir, target, shapes=None):
  """Classes of the `target` classifier: the trained pitches, or the instrument vocabulary."""
  shapes = shapes or config_lib.derive(config)
  if target == 'pitch':
    return shapes.num_pitches
  return num_instruments(config, workdir_lib.load_manifest(workdir))


def build_classifier(config, classes):
  return Classifier(num_classes=classes, widths=tuple(config.classifier.widths),
                    dtype=compute_dtype(config.classifier.train))


def classifier_init(model):
  return lambda rng, batch: model.init(rng, batch['image'])['params']


# --- training and reading back -------------------------------------------------------------------


def train(task, config, section, folder, workdir, fingerprint, train_images=True):
  """Trains `task` with the engine (hyper-parameters: config[section].train) on the prepared
  train split, evaluating on valid, then marks `folder` complete for `fingerprint`. Returns the
  final TrainState. `train_images=False`: train batches without 'image' (eval keeps them)."""
  ddir = workdir_lib.data_dir(workdir)
  batch = config[section].train.batch_size
  procs = jax.process_count()
  eval_batch = max(batch // procs, 1) * procs
  state = engine.train(
      task, config, section, folder,
      train_iter_fn=lambda: pipeline.make_iterator(config, ddir, 'train', batch_size=batch,
                                                   images=train_images),
      eval_iter_fn=lambda: pipeline.eval_batches(config, ddir, 'valid', batch_size=eval_batch))
  workdir_lib.mark_complete(folder, fingerprint, step=int(jax.device_get(state.step)))
  return state


def restore(folder, init, config, mesh, sample):
  """The params in folder/checkpoints (EMA when kept), sharded on `mesh`, for the model whose
  params `init(rng, batch)` builds from a batch like `sample` (only its shapes are used)."""
  target = engine.abstract_params(engine.Task(init=init, loss=None), config, mesh, sample)
  return checkpoint.restore_params(checkpoint.ckpt_dir(folder), target)


def _images(mesh, shapes):
  rows = max(mesh.size // jax.process_count(), 1)   # any batch the mesh can split
  return rows, {'image': np.zeros((rows,) + shapes.image, np.float32)}


def load_tokenizer(config, workdir, mesh):
  """(params, model) of the trained tokenizer; with the GAN on, the whole checkpoint tree is
  restored and only the tokenizer's part returned."""
  shapes = config_lib.derive(config)
  model = build_tokenizer(config, shapes)
  disc = build_discriminator(config, shapes) if gan_enabled(config) else None
  _, sample = _images(mesh, shapes)
  params = restore(workdir_lib.stage_dir(workdir, 'tokenizer'),
                   tokenizer_init(config, model, disc), config, mesh, sample)
  return tokenizer_params(config, params), model


def load_autoregressor(config, workdir, mesh, n_instruments):
  """(params, model) of the trained VAR."""
  shapes = config_lib.derive(config)
  model = ar.from_config(config, shapes, n_instruments)
  rows, sample = _images(mesh, shapes)
  sample.update(pitch=np.zeros((rows,), np.int32), instrument=np.zeros((rows,), np.int32))
  params = restore(workdir_lib.stage_dir(workdir, 'autoregressor'), var_init(model, shapes),
                   config, mesh, sample)
  return params, model


def load_classifier(config, workdir, target, mesh):
  """(params, model) of the trained `target` classifier."""
  shapes = config_lib.derive(config)
  model = build_classifier(config, classifier_classes(config, workdir, target, shapes))
  _, sample = _images(mesh, shapes)
  params = restore(workdir_lib.classifier_dir(workdir, target), classifier_init(model), config,
                   mesh, sample)
  return params, model
