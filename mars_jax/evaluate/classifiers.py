"""Stage-side glue for the evaluation classifiers: train through the engine, load, run.

Two classifiers read the same CMX image the tokenizer sees: 'pitch' (num_pitches classes,
midi - pitch_lo) and 'instrument' (the vocabulary of config.data.instrument_label). They live in
DIR/eval/{pitch,instrument}_classifier/ with the engine's checkpoints and metrics.jsonl, so a
killed run resumes and a finished one is skipped (fingerprint over the config sections that
change them, 'classifier' included).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax.data import pipeline
from mars_jax.data import prepare
from mars_jax.models.classifier import Classifier
from mars_jax.stages import common
from mars_jax.train import checkpoint, engine, partitioning

TARGETS = ('pitch', 'instrument')


def stage_dir(workdir, target):
  return fs.join(workdir, 'eval', f'{target}_classifier')


def fingerprint(config, target):
  """Changes iff the classifier's training data, input or hyper-parameters change."""
  return config_lib.fingerprint(config, 'seed', 'data', 'spectrogram', 'cmx', 'classifier',
                                exclude=prepare._NOT_CONTENT) + f'-{target}'


def num_classes(config, workdir, target, shapes=None):
  shapes = shapes or config_lib.derive(config)
  if target == 'pitch':
    return shapes.num_pitches
  vocab = pipeline.load_manifest(common.data_dir(workdir))['vocab']
  return len(vocab[config.data.instrument_label])


def build_model(config, classes):
  dtype = jnp.bfloat16 if config.classifier.train.compute_dtype == 'bfloat16' else jnp.float32
  return Classifier(num_classes=classes, widths=tuple(config.classifier.widths), dtype=dtype)


def make_task(config, target, classes):
  """Softmax cross-entropy on batch[target]; eval reports masked loss and accuracy."""
  if target not in TARGETS:
    raise ValueError(f'classifier target {target!r}: use one of {TARGETS}')
  model = build_model(config, classes)

  def init(rng, batch):
    return model.init(rng, batch['image'])['params']

  def loss(params, batch, rng, step):
    logits, _ = model.apply({'params': params}, batch['image'])
    logits = logits.astype(jnp.float32)
    labels = batch[target]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean((logits.argmax(-1) == labels).astype(jnp.float32))
    return ce, {'accuracy': acc}

  def eval_fn(params, batch):
    logits, _ = model.apply({'params': params}, batch['image'])
    logits = logits.astype(jnp.float32)
    mask = batch['mask'].astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[target])
    hit = (logits.argmax(-1) == batch[target]).astype(jnp.float32)
    return {'loss': jnp.sum(ce * mask) / n, 'accuracy': jnp.sum(hit * mask) / n}

  return engine.Task(init=init, loss=loss, eval_fn=eval_fn), model


def is_trained(config, workdir, target):
  return common.is_complete(stage_dir(workdir, target), fingerprint(config, target))


def train(config, workdir, target, log=print):
  """Trains (or resumes) one classifier on the prepared train split; skipped when complete."""
  sdir = stage_dir(workdir, target)
  fp = fingerprint(config, target)
  if common.is_complete(sdir, fp):
    log(f'[evaluate] {target} classifier: trained and matching the config, skipped')
    return
  common.claim(sdir, fp, f'{target} classifier')
  data_dir = common.data_dir(workdir)
  tc = config.classifier.train
  task, _ = make_task(config, target, num_classes(config, workdir, target))
  eval_bs = max(tc.batch_size // jax.process_count(), 1) * jax.process_count()
  state = engine.train(
      task, config, 'classifier', sdir,
      train_iter_fn=lambda: pipeline.make_iterator(config, data_dir, 'train',
                                                   batch_size=tc.batch_size),
      eval_iter_fn=lambda: pipeline.eval_batches(config, data_dir, 'valid', batch_size=eval_bs))
  common.mark_complete(sdir, fp, step=int(jax.device_get(state.step)))


def load(config, workdir, target, mesh):
  """(params sharded on `mesh`, model) of a trained classifier."""
  shapes = config_lib.derive(config)
  task, model = make_task(config, target, num_classes(config, workdir, target, shapes))
  rows = max(mesh.size // jax.process_count(), 1)
  sample = {'image': np.zeros((rows,) + shapes.image, np.float32)}
  target_tree = engine.abstract_params(task, config, mesh, sample)
  params = checkpoint.restore_params(checkpoint.ckpt_dir(stage_dir(workdir, target)), target_tree)
  return params, model


_JIT_CACHE = {}


def cached_jit(key, make_fn, mesh):
  """One jitted function per (key, mesh): a fresh closure per call would recompile every time."""
  k = (key, mesh)
  if k not in _JIT_CACHE:
    _JIT_CACHE[k] = jax.jit(make_fn(), out_shardings=partitioning.replicated(mesh))
  return _JIT_CACHE[k]


def batched_apply(jitted, params, images, mesh, batch_size=64):
  """Runs jitted(params, images) -> pytree of (B, ...) over all `images` (N, H, W, C).

  Every process passes the same full array; each batch is split over the mesh's batch axes and
  the results come back replicated, so this works unchanged on one device or a pod. Batches
  have one fixed shape (the tail is zero-padded, then trimmed): one compile per function.
  """
  images = np.asarray(images, np.float32)
  n = len(images)
  dp = mesh.shape['data'] * mesh.shape['fsdp']
  bs = -(-batch_size // dp) * dp
  sharding = partitioning.batch_sharding(mesh)
  outs = []
  for i in range(0, n, bs):
    x = images[i:i + bs]
    m = len(x)
    if m < bs:
      x = np.concatenate([x, np.zeros((bs - m,) + x.shape[1:], x.dtype)])
    arr = jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx])
    out = jax.device_get(jitted(params, arr))
    outs.append(jax.tree.map(lambda a, m=m: np.asarray(a)[:m], out))
  if not outs:
    return None
  return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def probs_and_embeddings(model, params, images, mesh, batch_size=64):
  """(probs (N, classes), embeddings (N, D)) as float64 numpy."""
  def make():
    def fn(p, x):
      logits, emb = model.apply({'params': p}, x)
      return jax.nn.softmax(logits.astype(jnp.float32), -1), emb.astype(jnp.float32)
    return fn
  key = ('classifier', model.num_classes, tuple(model.widths), model.groups, str(model.dtype))
  probs, emb = batched_apply(cached_jit(key, make, mesh), params, images, mesh, batch_size)
  return probs.astype(np.float64), emb.astype(np.float64)
