"""The frozen tokenizer's tokens of every train example, encoded once when the autoregressor starts.

The tokenizer does not change while the VAR trains, so encoding each spectrogram again in every
train step repeats the same work once an epoch: 9-10% of the step at the tiny and mid shapes
(BENCHMARKS.md). One pass over the train split instead gives a table (N, L) of flat token
indices, row i for the example whose 'index' is i (data/pipeline.py), that the step gathers by
the batch's 'index'. The table lives in memory and is rebuilt when a run starts or resumes: it is
a pure function of the tokenizer's params and the data, so there is no second dataset format to
keep in step with the tokenizer. Rows are bit for bit the tokens the step would have encoded
(tests/test_token_table.py).

config.autoregressor.token_cache: 'auto' caches when the run reads at least one epoch (steps x
batch >= examples: the pass costs one epoch of encoding and saves all the others), 'on' and
'off' force it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mars_jax import progress
from mars_jax.data import pipeline
from mars_jax.models import autoregressor as ar
from mars_jax.models.tokenizer import Tokenizer
from mars_jax.train import partitioning

def flat_tokens(tok_model, tok_params, images):
  """Images (B, H, W, C) -> the token maps of every scale, flattened and joined: (B, L) int32."""
  maps = tok_model.apply({'params': tok_params}, images, method=Tokenizer.encode_tokens)
  return jnp.concatenate([t.reshape(t.shape[0], -1) for t in maps], axis=1)


def scale_maps(flat, scales):
  """(B, L) flat tokens -> [(B, p_k, p_k) for every scale p_k]: the inverse of the join above."""
  return [flat[:, a:b].reshape(flat.shape[0], p, p)
          for p, (a, b) in zip(scales, ar.scale_bounds(scales))]


def wanted(config, n_examples: int) -> bool:
  """Whether the autoregressor stage caches its tokens (config.autoregressor.token_cache)."""
  mode = config.autoregressor.token_cache
  if mode == 'auto':
    tc = config.autoregressor.train
    return int(tc.steps) * int(tc.batch_size) >= n_examples
  return mode == 'on'


def encode_split(config, data_dir, mesh, tok_model, tok_params, split='train', batch_size=None):
  """(N, L) int32 numpy, on every process: row i holds the flat tokens of `split`'s example i.

  Every process reads its share of each global batch (pipeline.eval_batches, padded), the
  encoder runs sharded over the mesh like a train step, and the rows are gathered to every
  process, which each keep the whole table (the shuffle sends any example to any process).
  """
  procs = jax.process_count()
  batch = batch_size or int(config.autoregressor.train.batch_size)
  batch = max(batch // procs, 1) * procs
  encode = jax.jit(lambda params, images: flat_tokens(tok_model, params, images))
  batches = pipeline.eval_batches(config, data_dir, split, batch)
  n = len(pipeline.open_split(config, data_dir, split)[0])
  table = None
  bar = progress.Progress('token cache', total=n, unit='examples', every=max(n // 4, 1))
  done = 0
  with jax.set_mesh(mesh):
    for local in batches:
      device = partitioning.put_batch({k: local[k] for k in ('image', 'index', 'mask')}, mesh)
      tokens = encode(tok_params, device['image'])                       # (B, L)
      tokens, index, mask = (np.asarray(x) for x in multihost_utils.process_allgather(
          (tokens, device['index'], device['mask']), tiled=True))
      if table is None:
        table = np.full((n, tokens.shape[1]), -1, np.int32)
      table[index[mask]] = tokens[mask]
      done += int(mask.sum())
      bar.update(done)
  bar.close()
  if table is None or (table < 0).any():
    raise pipeline.DataError(f'encoding the {split!r} split left rows without tokens (read '
                             f'{done} of {n} examples); rerun the prepare stage.')
  return table


def of_batch(tok_model, tok_params, images, mesh):
  """A stand-in split for benchmarks: the table of one local batch of images, replicated on
  `mesh`, and the 'index' (rows,) int32 that reads it back in order."""
  with jax.set_mesh(mesh):
    batch = partitioning.put_batch({'image': images}, mesh)
    flat = jax.jit(lambda p, x: flat_tokens(tok_model, p, x))(tok_params, batch['image'])
    table = np.asarray(multihost_utils.process_allgather(flat, tiled=True))
  return to_device(table, mesh), np.arange(images.shape[0], dtype=np.int32)


def to_device(table, mesh):
  """The table as one jax Array replicated over `mesh`, built from each process's own copy;
  uint16 where every token fits (codebooks up to 65,536 codes: half the memory of int32)."""
  if table.size == 0 or int(table.max()) < 2**16:
    table = table.astype(np.uint16)
  return jax.make_array_from_callback(table.shape, partitioning.replicated(mesh),
                                      lambda index: table[index])
