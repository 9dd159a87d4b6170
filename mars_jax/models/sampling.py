"""Next-scale sampling: K steps with a static-shape KV cache, CFG, top-k / top-p, per-sample seeds.

`sample_tokens` is written to be wrapped in ONE `jax.jit`: the loop over the K scales is a
Python loop (K is static), every shape is static, and the cache is updated in place with
`lax.dynamic_update_slice`. Bind the static parts with functools.partial and jit the rest:

    fn = jax.jit(functools.partial(sample_tokens, model, next_input_fn=q_step,
                                   latent_shape=shapes.latent, top_k=600, top_p=0.96))
    tokens, f_hat = fn(variables, pitch, inst, seeds, key, cfg=3.0)

Static: `model`, `next_input_fn`, `latent_shape`, `guidance` (whether the NULL-condition rows are
run at all), `top_k`, `top_p` (they choose the filter's shapes: see `filter_logits`). Traced
(changing them does not recompile): `cfg`, `temperature`. top_k <= 0 (or >= V) and top_p <= 0
(or >= 1) disable the respective filter.

Randomness: row b draws with key fold_in(fold_in(key, seeds[b]), k) at scale k, so a sample
depends on its own seed only, never on its batch neighbours.

`next_input_fn(k, f_hat, tokens_k) -> (f_hat, next_in)` is the tokenizer's quantizer step:
it adds scale k's codes (tokens_k: (B, p_k, p_k) int32) to f_hat (B, h, w, d) and returns the
teacher input for scale k+1, (B, p_{k+1}^2, d) row-major, or None after the last scale.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mars_jax.models.autoregressor import VAR, init_cache, scale_bounds


def guidance_weight(cfg, k: int, num_scales: int):
  """w_k = cfg * k / (K-1): no guidance at the first scale, full `cfg` at the last."""
  return cfg * (k / max(num_scales - 1, 1))


def filter_logits(logits, top_k: int, top_p: float):
  """Keeps the top_k largest logits, then the smallest nucleus of mass >= top_p among them.

  logits (..., V); top_k and top_p are static Python numbers (each setting compiles once):
  top_k <= 0 or >= V and top_p <= 0 or >= 1 turn the respective filter off (VAR's convention),
  and with both off the logits pass through untouched. Only the top_k slice is sorted
  (`lax.top_k`), never the whole vocabulary: sorting is slow on XLA's CPU backend. Everything
  dropped becomes -inf; the most likely token is always kept; ties at the cut-off are kept.
  """
  v = logits.shape[-1]
  k = v if (top_k <= 0 or top_k >= v) else int(top_k)
  nucleus = 0.0 < top_p < 1.0
  if k == v and not nucleus:
    return logits
  top = jax.lax.top_k(logits, k)[0]                                   # (..., k) descending
  n_keep = k
  if nucleus:
    probs = jax.nn.softmax(top, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                       # mass of better tokens
    keep = (before < top_p) | (jnp.arange(k) == 0)                    # a prefix, >= 1 long
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    cut = jnp.take_along_axis(top, n_keep - 1, axis=-1)               # (..., 1)
  else:
    cut = top[..., k - 1:k]
  return jnp.where(logits >= cut, logits, -jnp.inf)


def _row_keys(key, seeds):
  return jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(seeds, jnp.uint32))


def _choose(logits, k, num_scales, batch, row_keys, guidance, cfg, top_k, top_p, temperature):
  """Guided, filtered categorical draw for scale k: (R, n, V) logits -> (B, n) int32."""
  logits = logits.astype(jnp.float32)
  if guidance:
    w = guidance_weight(cfg, k, num_scales)
    logits = (1 + w) * logits[:batch] - w * logits[batch:]
  logits = filter_logits(logits / temperature, top_k, top_p)
  keys = jax.vmap(lambda rk: jax.random.fold_in(rk, k))(row_keys)
  draw = jax.vmap(lambda kk, lg: jax.random.categorical(kk, lg, axis=-1))
  return draw(keys, logits).astype(jnp.int32)


def _variables(params):
  return params if 'params' in params else {'params': params}


def _rows(model, pitch, inst, guidance):
  """Conditional rows, then (with guidance) the same number of NULL-condition rows."""
  pitch, inst = jnp.asarray(pitch, jnp.int32), jnp.asarray(inst, jnp.int32)
  if not guidance:
    return pitch, inst
  return (jnp.concatenate([pitch, jnp.full_like(pitch, model.num_pitches)]),
          jnp.concatenate([inst, jnp.full_like(inst, model.num_instruments)]))


def sample_tokens(model: VAR, params, pitch, inst, seeds, key, *,
                  next_input_fn: Callable, latent_shape: Sequence[int],
                  cfg=0.0, top_k=0, top_p=1.0, temperature=1.0, guidance: bool = True):
  """Samples token maps with the KV cache.

  pitch, inst, seeds: (B,) int; key: a PRNG key shared by the batch (rows differ by seed).
  params: the variables dict of `model` (or its 'params' tree). Returns
  (tokens: list over scales of (B, p_k, p_k) int32, f_hat (B, *latent_shape) float32).
  """
  variables = _variables(params)
  batch, num_scales = jnp.shape(pitch)[0], len(model.scales)
  rows_p, rows_i = _rows(model, pitch, inst, guidance)
  cond = model.apply(variables, rows_p, rows_i, method=VAR.condition)    # (R, C)
  cache = init_cache(model, rows_p.shape[0])
  row_keys = _row_keys(key, seeds)
  f_hat = jnp.zeros((batch,) + tuple(latent_shape), jnp.float32)
  inputs, tokens = None, []
  for k, p in enumerate(model.scales):
    logits, cache = model.apply(variables, cond, inputs, k, cache, method=VAR.decode)
    tok = _choose(logits, k, num_scales, batch, row_keys, guidance, cfg, top_k, top_p,
                  temperature).reshape(batch, p, p)
    tokens.append(tok)
    f_hat, nxt = next_input_fn(k, f_hat, tok)
    if k + 1 < num_scales:
      inputs = jnp.concatenate([nxt, nxt], 0) if guidance else nxt   # (R, p_{k+1}^2, d)
  return tokens, f_hat


def sample_tokens_nocache(model: VAR, params, pitch, inst, seeds, key, *,
                          next_input_fn: Callable, latent_shape: Sequence[int],
                          cfg=0.0, top_k=0, top_p=1.0, temperature=1.0, guidance: bool = True):
  """Reference for tests: same draws as `sample_tokens`, but re-runs the whole block-causal
  forward at every scale (future inputs zero, hidden by the mask) instead of using a cache."""
  variables = _variables(params)
  batch, num_scales = jnp.shape(pitch)[0], len(model.scales)
  bounds = scale_bounds(model.scales)
  first = bounds[0][1]
  rows_p, rows_i = _rows(model, pitch, inst, guidance)
  teacher = jnp.zeros((rows_p.shape[0], model.num_tokens - first, model.code_dim), jnp.float32)
  row_keys = _row_keys(key, seeds)
  f_hat = jnp.zeros((batch,) + tuple(latent_shape), jnp.float32)
  tokens = []
  for k, p in enumerate(model.scales):
    start, end = bounds[k]
    logits = model.apply(variables, rows_p, rows_i, teacher)[:, start:end]
    tok = _choose(logits, k, num_scales, batch, row_keys, guidance, cfg, top_k, top_p,
                  temperature).reshape(batch, p, p)
    tokens.append(tok)
    f_hat, nxt = next_input_fn(k, f_hat, tok)
    if k + 1 < num_scales:
      nxt = jnp.concatenate([nxt, nxt], 0) if guidance else nxt
      s1, e1 = bounds[k + 1]
      teacher = teacher.at[:, s1 - first:e1 - first].set(nxt.astype(teacher.dtype))
  return tokens, f_hat
