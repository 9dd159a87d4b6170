"""The evaluation classifiers: their training task, and running them over many images.

Two classifiers read the same CMX image the tokenizer sees: 'pitch' (num_pitches classes,
midi - pitch_lo) and 'instrument' (the vocabulary of config.data.instrument_label). They live in
DIR/eval/{pitch,instrument}_classifier/ with the engine's checkpoints and metrics.jsonl, so a
killed run resumes and a finished one is skipped (fingerprint over the config sections that
change them, 'classifier' included). mars_jax.trained builds and loads them.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from mars_jax import progress
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.train import engine, partitioning

TARGETS = workdir_lib.CLASSIFIER_TARGETS


def make_task(config, target, classes):
  """Softmax cross-entropy on batch[target]; eval reports masked loss and accuracy."""
  if target not in TARGETS:
    raise ValueError(f'classifier target {target!r}: use one of {TARGETS}')
  model = trained.build_classifier(config, classes)

  def loss(params, batch, rng, step, frozen):
    logits, _ = model.apply({'params': params}, batch['image'])
    logits = logits.astype(jnp.float32)
    labels = batch[target]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean((logits.argmax(-1) == labels).astype(jnp.float32))
    return engine.Loss(ce, {'accuracy': acc})

  def eval_fn(params, batch, frozen):
    logits, _ = model.apply({'params': params}, batch['image'])
    logits = logits.astype(jnp.float32)
    mask = batch['mask'].astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[target])
    hit = (logits.argmax(-1) == batch[target]).astype(jnp.float32)
    return {'loss': jnp.sum(ce * mask) / n, 'accuracy': jnp.sum(hit * mask) / n}

  return engine.Task(init=trained.classifier_init(model), loss=loss, eval_fn=eval_fn), model


def train(config, workdir, target, log=progress.say):
  """Trains (or resumes) one classifier on the prepared train split; skipped when complete."""
  folder = workdir_lib.classifier_dir(workdir, target)
  fp = workdir_lib.classifier_fingerprint(config, target)
  if workdir_lib.is_complete(folder, fp):
    log(f'[evaluate] {target} classifier: trained and matching the config, skipped')
    return
  workdir_lib.claim(folder, fp, f'{target} classifier')
  task, _ = make_task(config, target, trained.classifier_classes(config, workdir, target))
  trained.train(task, config, 'classifier', folder, workdir, fp)


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
  have one fixed shape (the tail is zero-padded, then trimmed): one compile per function. Fewer
  than `batch_size` images run as a power-of-two multiple of the data-parallel size instead, so
  a handful of notes is not padded to a whole batch (at most log2(batch_size) more shapes).
  """
  images = np.asarray(images, np.float32)
  n = len(images)
  dp = mesh.shape['data'] * mesh.shape['fsdp']
  per_shard = -(-batch_size // dp)
  if n < per_shard * dp:
    per_shard = min(per_shard, 1 << max(0, -(-n // dp) - 1).bit_length())
  bs = per_shard * dp
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
