"""VAR scale autoregressor: an AdaLN transformer that predicts all tokens of scale k at once.

Sequence layout: the token maps of all scales, coarse to fine, each flattened row-major,
concatenated into L = sum(p_k^2) positions. The first scale's positions hold the start token
(the condition); scale k > 0 holds the teacher-forcing input for scale k, i.e. the cumulative
f_hat of scales < k resized to p_k x p_k (supplied by the tokenizer, never computed here).
Attention is block-causal: full inside a scale, causal across scales.

Two entry points share one set of parameters:
  * `__call__`  -- the whole sequence at once (training, reference sampling);
  * `decode`    -- one scale against a KV cache of static shape (B, heads, L, head_dim) per layer,
                   so the sampler is a single jit with a Python loop over the K scales.
Layers are stacked with `nn.scan` (one compiled block however deep the model), so every
block parameter and the cache carry a leading layer axis (logical name None: never sharded).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mars_jax.models import lean_grads
from mars_jax.models.layers import trunc_normal

Dtype = Any

ACT = ('batch', None, 'embed')          # (B, L, C) activations at block boundaries
_LN_EPS = 1e-6
# How attention is computed (config autoregressor.attention); all give the same function:
#   einsum  two einsums and a float32 softmax (the reference path, fastest on CPU), by query
#           groups (`query_groups`); it keeps the scores each group can see (64% of the
#           (B, H, L, L) at base's scales) for the backward pass: 111 GiB before, at batch 64;
#   xla / cudnn  jax.nn.dot_product_attention with that implementation; cudnn is the fused
#           kernel (GPU, bf16/fp16), which never stores the scores: 65 GiB at base, batch 64;
#   auto    resolved by `from_config`: cudnn on a GPU with a 16-bit compute dtype, else einsum.
#           (jax's own implementation=None picks XLA for our block-causal mask.)
ATTENTION = ('einsum', 'xla', 'cudnn', 'auto')
_MAX_LOG_SCALE = math.log(100.0)        # VAR clamps the learned attention temperature here
# What each transformer block keeps for the backward pass (config autoregressor.remat); the
# rest is recomputed there. The same function and gradients whichever is chosen:
#   none  everything (fastest; the saved activations grow with depth x batch x L^2);
#   dots  the outputs of the weight matmuls (qkv, proj, fc1, fc2) only: the attention scores
#         and softmax, the norms and the GELU are recomputed (jax's
#         dots_with_no_batch_dims_saveable; the attention einsums have batch dimensions);
#   full  nothing but each block's input (nothing_saveable): the whole block runs twice.
REMAT = {'none': None,
         'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
         'full': jax.checkpoint_policies.nothing_saveable}


def _p(init, names):
  return nn.with_logical_partitioning(init, names)


def _constrain(x, names=ACT):
  return nn.with_logical_constraint(x, names)


def scale_bounds(scales: Sequence[int]) -> tuple:
  """(start, end) token offsets of every scale in the flattened sequence."""
  out, s = [], 0
  for p in scales:
    out.append((s, s + p * p))
    s += p * p
  return tuple(out)


def level_index(scales: Sequence[int]) -> np.ndarray:
  """Scale index of every position, (L,) int32."""
  return np.concatenate([np.full(p * p, k, np.int32) for k, p in enumerate(scales)])


def block_causal_mask(scales: Sequence[int]) -> np.ndarray:
  """(L, L) bool: query i may attend key j iff scale(j) <= scale(i)."""
  lvl = level_index(scales)
  return lvl[None, :] <= lvl[:, None]


# The einsum path attends each query scale to the keys it can see and no further (`query_groups`):
# the block-causal mask zeroes 20% of the (L, L) scores at tiny.py's scales and 38% at base's,
# work that would otherwise be computed, masked, soft-maxed, stored for the backward pass and
# multiplied by zero there. A group holds at least this many queries (small scales share one,
# with the mask inside it): on a CPU, splitting tiny.py's 85 tokens into 21 + 64 queries was
# slower than one masked product (BENCHMARKS.md, issue 14), base's 680 into 4 groups faster.
_GROUP_MIN_QUERIES = 128


def query_groups(scales: Sequence[int]) -> tuple:
  """((q_start, q_end, key_end), ...): consecutive runs of whole scales whose queries attend the
  keys [0, key_end) only, key_end = q_end (block-causal). A run closes once it holds
  `_GROUP_MIN_QUERIES` queries; a scale that large starts a run of its own."""
  out, start = [], 0
  for s, e in scale_bounds(scales):
    if s > start and e - s >= _GROUP_MIN_QUERIES:   # a large scale starts its own group
      out.append((start, s, s))
      start = s
    if e - start >= _GROUP_MIN_QUERIES:
      out.append((start, e, e))
      start = e
  if start < e:   # the last run, shorter than the minimum
    out.append((start, e, e))
  return tuple(out)


def _layer_norm(x):
  """LayerNorm without affine parameters (AdaLN supplies scale and shift), in float32."""
  return lean_grads.layer_norm(x.astype(jnp.float32), _LN_EPS).astype(x.dtype)


def _l2_normalize(x):
  return lean_grads.l2_normalize(x.astype(jnp.float32), 1e-12)


def gate_init_for_depth(depth: int) -> float:
  """VAR's AdaLN gate init (`alng`) as its released models were trained: 1e-3 up to depth 20,
  1e-4 up to 24, 1e-5 deeper (residual branches start nearer identity in deeper models)."""
  return 1e-3 if depth <= 20 else 1e-4 if depth <= 24 else 1e-5


def drop_path_for_depth(depth: int) -> float:
  """VAR's stochastic-depth rate at the last block: 0.1 * depth / 24."""
  return 0.1 * depth / 24


def _ada_init(std, width, gate_chunks, gate_mult=1e-3, other_mult=0.5):
  """AdaLN projection init: gates (the first `gate_chunks` chunks) start small so every residual
  branch starts near identity (VAR's init_adaln_gamma); scales/shifts small (init_adaln=0.5)."""
  def init(key, shape, dtype=jnp.float32):
    w = trunc_normal(std)(key, shape, dtype)
    mult = jnp.concatenate([jnp.full((gate_chunks * width,), gate_mult, dtype),
                            jnp.full((shape[-1] - gate_chunks * width,), other_mult, dtype)])
    return w * mult
  return init


def _attend(q, k, v, mask):
  """softmax(q k^T) v with float32 scores; masked keys get weight exactly 0.
  q (B, H, n, hd), k and v (B, H, m, hd), mask None or broadcastable to (n, m)."""
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)   # (B, H, n, m)
  if mask is not None:   # an additive 0 / -inf bias: a where() would save the mask per batch row
    s = s + jnp.where(mask, 0.0, -jnp.inf).astype(s.dtype)
  w = lean_grads.softmax(s)
  return jnp.einsum('bhqk,bhkd->bhqd', w.astype(v.dtype), v)


class Attention(nn.Module):
  """Self-attention with L2-normalised q/k and a learned per-head temperature (VAR attn_l2_norm)."""
  width: int
  heads: int
  depth: int
  dtype: Dtype = jnp.float32
  attention: str = 'einsum'   # 'einsum' | 'xla' | 'cudnn': see ATTENTION
  scales: Sequence[int] = ()  # token map sides: without a cache, einsum attends by query_groups

  @nn.compact
  def __call__(self, x, cache, mask, offset):
    # x (B, n, C); mask broadcastable to (n, L_keys); cache None or {'k','v'}: (B, H, L, hd).
    # With `scales` and no cache, x is the whole sequence, attended block-causally by query
    # groups (einsum path; `mask` is not read there).
    h, hd = self.heads, self.width // self.heads
    std = math.sqrt(1.0 / (3 * self.width))
    # Explicit params, not DenseGeneral: its flat-then-reshape init trips the logical constraint
    # under a mesh (flax applies the 4-d names to the 2-d flat kernel).
    w_qkv = self.param('qkv', _p(trunc_normal(std),
                                 ('embed', None, 'heads', None)), (self.width, 3, h, hd))
    qkv = jnp.einsum('bnc,cthd->bnthd', x.astype(self.dtype),
                     w_qkv.astype(self.dtype))                       # (B, n, 3, H, hd)
    q_bias = self.param('q_bias', _p(nn.initializers.zeros, ('heads', None)), (h, hd))
    v_bias = self.param('v_bias', _p(nn.initializers.zeros, ('heads', None)), (h, hd))
    log_scale = self.param('log_scale', _p(nn.initializers.constant(math.log(4.0)), ('heads',)),
                           (h,))
    scale = jnp.exp(jnp.minimum(log_scale, _MAX_LOG_SCALE))          # (H,)
    q, k, v = lean_grads.unstack(qkv, 2)                              # each (B, n, H, hd)
    q = _l2_normalize(q + q_bias) * scale[:, None]                    # (B, n, H, hd) f32
    k = _l2_normalize(k)
    v = v + v_bias.astype(v.dtype)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))              # (B, H, n, hd)
    q = nn.with_logical_constraint(q, ('batch', 'heads', None, None))
    if cache is not None:
      # Write this scale's keys/values at its offset; later reads see every filled position.
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, 0, offset, 0))
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, 0, offset, 0))
      k = nn.with_logical_constraint(k, ('batch', 'heads', None, None))
      v = nn.with_logical_constraint(v, ('batch', 'heads', None, None))
      cache = {'k': k, 'v': v}
    if self.attention == 'einsum':
      q, k, v = (t.astype(self.dtype) for t in (q, k, v))
      if cache is None and self.scales:   # the whole sequence: each query group sees its prefix
        full = block_causal_mask(self.scales)
        outs = []
        for qs, qe, ke in query_groups(self.scales):
          m = full[qs:qe, :ke]
          outs.append(_attend(q[:, :, qs:qe], k[:, :, :ke], v[:, :, :ke],
                              None if m.all() else m))               # (B, H, qe - qs, hd)
        o = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
      else:
        o = _attend(q, k, v, mask)                                    # (B, H, n, hd)
      o = jnp.swapaxes(o, 1, 2)                                       # (B, n, H, hd)
    else:  # jax's fused attention; q already carries the temperature, hence scale 1
      q, k, v = (jnp.swapaxes(t, 1, 2).astype(self.dtype) for t in (q, k, v))  # (B, n|L, H, hd)
      o = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask, bool), scale=1.0,
                                       implementation=self.attention)  # (B, n, H, hd)
    proj_init = trunc_normal(std / math.sqrt(2 * self.depth))
    w_proj = self.param('proj', _p(proj_init, ('heads', None, 'embed')), (h, hd, self.width))
    b_proj = self.param('proj_bias', _p(nn.initializers.zeros, ('embed',)), (self.width,))
    out = jnp.einsum('bnhd,hdc->bnc', o, w_proj.astype(self.dtype)) + b_proj.astype(self.dtype)
    return out, cache


class Block(nn.Module):
  """AdaLN transformer block: x += g1*attn(LN(x)(1+s1)+b1); x += g2*mlp(LN(x)(1+s2)+b2)."""
  width: int
  heads: int
  depth: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = 'einsum'
  gate_init: float = 1e-3
  scales: Sequence[int] = ()   # see Attention.scales

  @nn.compact
  def __call__(self, x, cache, cond, mask, offset, drop_rate):
    # x (B, n, C) carry; cache per-layer slice; cond (B, C); mask (n, L) or broadcastable;
    # drop_rate: this block's stochastic-depth rate (a scalar), or None (no drop path).
    c = self.width
    std = math.sqrt(1.0 / (3 * c))
    ada = nn.Dense(6 * c, dtype=self.dtype, name='ada',
                   kernel_init=_p(_ada_init(std, c, gate_chunks=2, gate_mult=self.gate_init),
                                  ('embed', 'mlp')),
                   bias_init=_p(nn.initializers.zeros, ('mlp',)))(nn.silu(cond))
    ada = ada.reshape(ada.shape[0], 1, 6, c)                          # (B, 1, 6, C)
    g1, g2, s1, s2, b1, b2 = (ada[:, :, i] for i in range(6))         # each (B, 1, C)

    if drop_rate is not None:   # per-note keep masks, rescaled so the expectation is unchanged
      keep = 1.0 - drop_rate
      k1, k2 = jax.random.split(self.make_rng('dropout'))
      g1 = g1 * (jax.random.bernoulli(k1, keep, (x.shape[0], 1, 1)) / keep).astype(g1.dtype)
      g2 = g2 * (jax.random.bernoulli(k2, keep, (x.shape[0], 1, 1)) / keep).astype(g2.dtype)

    h = _layer_norm(x) * (1 + s1) + b1
    h, cache = Attention(c, self.heads, self.depth, self.dtype, self.attention, self.scales,
                         name='attn')(h, cache, mask, offset)
    x = _constrain(x + h * g1)

    hidden = int(round(c * self.mlp_ratio))
    h = _layer_norm(x) * (1 + s2) + b2
    h = nn.Dense(hidden, dtype=self.dtype, name='fc1',
                 kernel_init=_p(trunc_normal(std), ('embed', 'mlp')),
                 bias_init=_p(nn.initializers.zeros, ('mlp',)))(h)
    h = nn.with_logical_constraint(lean_grads.gelu_tanh(h), ('batch', None, 'mlp'))
    h = nn.Dense(c, dtype=self.dtype, name='fc2',
                 kernel_init=_p(trunc_normal(std / math.sqrt(2 * self.depth)),
                                ('mlp', 'embed')),
                 bias_init=_p(nn.initializers.zeros, ('embed',)))(h)
    x = _constrain(x + h * g2)
    return x, cache


class VAR(nn.Module):
  """Next-scale prediction transformer conditioned on (pitch, instrument).

  Condition ids: pitch in [0, num_pitches) (i.e. MIDI - pitch_lo), instrument in
  [0, num_instruments); id num_pitches / num_instruments is NULL (classifier-free guidance).
  """
  vocab_size: int
  code_dim: int
  scales: Sequence[int]
  num_pitches: int
  num_instruments: int
  depth: int = 16
  width: int = 1024
  heads: int = 16
  mlp_ratio: float = 4.0
  label_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  attention: str = 'einsum'
  gate_init: float = 1e-3       # AdaLN gate init (VAR's alng; see gate_init_for_depth)
  drop_path: float = 0.0        # stochastic depth at the last block, 0 at the first; training only
  remat: str = 'none'           # what a block saves for the backward pass: see REMAT

  @property
  def num_tokens(self) -> int:
    return sum(p * p for p in self.scales)

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  def setup(self):
    c = self.width
    std = math.sqrt(1.0 / (3 * c))
    tn = trunc_normal(std)
    first = self.scales[0] ** 2
    self.pitch_embed = self.param('pitch_embed', _p(tn, (None, 'embed')), (self.num_pitches + 1, c))
    self.inst_embed = self.param('inst_embed', _p(tn, (None, 'embed')),
                                 (self.num_instruments + 1, c))
    self.pos_start = self.param('pos_start', _p(tn, (None, 'embed')), (first, c))
    self.pos_embed = self.param('pos_embed', _p(tn, (None, 'embed')), (self.num_tokens, c))
    self.level_embed = self.param('level_embed', _p(tn, (None, 'embed')), (len(self.scales), c))
    self.word_embed = nn.Dense(c, dtype=self.dtype,
                               kernel_init=_p(tn, (None, 'embed')),
                               bias_init=_p(nn.initializers.zeros, ('embed',)))
    block = Block
    if self.remat != 'none':   # per block, inside the scan; no CSE barrier needed under scan
      block = nn.remat(Block, policy=REMAT[self.remat], prevent_cse=False)
    self.blocks = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: None},
    )(c, self.heads, self.depth, self.mlp_ratio, self.dtype, self.attention, self.gate_init,
      tuple(self.scales))
    # The AdaLN head and the logits in float32 whatever the compute dtype: classifier-free
    # guidance multiplies their rounding error by up to 1 + 2 * cfg.
    self.head_ada = nn.Dense(2 * c, dtype=jnp.float32,
                             kernel_init=_p(_ada_init(std, c, gate_chunks=0), ('embed', 'mlp')),
                             bias_init=_p(nn.initializers.zeros, ('mlp',)))
    self.head = nn.Dense(self.vocab_size, dtype=jnp.float32,
                         kernel_init=_p(trunc_normal(0.02 * std),
                                        ('embed', 'vocab')),
                         bias_init=_p(nn.initializers.zeros, ('vocab',)))

  def condition(self, pitch, inst, train: bool = False):
    """(B,) ids -> (B, C) condition; in training both ids become NULL with p=label_dropout."""
    if train and self.label_dropout > 0:
      drop = jax.random.bernoulli(self.make_rng('dropout'), self.label_dropout, pitch.shape)
      pitch = jnp.where(drop, self.num_pitches, pitch)
      inst = jnp.where(drop, self.num_instruments, inst)
    cond = jnp.take(self.pitch_embed, pitch, axis=0) + jnp.take(self.inst_embed, inst, axis=0)
    return cond.astype(self.dtype)                                    # (B, C)

  def _head(self, x, cond):
    ada = self.head_ada(nn.silu(cond.astype(jnp.float32)))
    ada = ada.reshape(ada.shape[0], 1, 2, self.width)                 # (B, 1, 2, C) f32
    h = _layer_norm(x.astype(jnp.float32)) * (1 + ada[:, :, 0]) + ada[:, :, 1]
    logits = self.head(h)                                             # (B, n, V) f32
    return nn.with_logical_constraint(logits, ('batch', None, 'vocab'))

  def _start(self, cond):
    return cond[:, None, :] + self.pos_start.astype(self.dtype)       # (B, p_0^2, C)

  def __call__(self, pitch, inst, teacher_inputs, train: bool = False):
    """Logits for every position: (B,), (B,), (B, L - p_0^2, code_dim) -> (B, L, V) float32."""
    cond = self.condition(pitch, inst, train)
    x = jnp.concatenate([self._start(cond), self.word_embed(teacher_inputs.astype(self.dtype))], 1)
    lvl = jnp.asarray(level_index(self.scales))
    x = x + (jnp.take(self.level_embed, lvl, axis=0) + self.pos_embed).astype(self.dtype)
    x = _constrain(x)                                                 # (B, L, C)
    mask = jnp.asarray(block_causal_mask(self.scales))                # (L, L)
    rates = None
    if train and self.drop_path > 0:   # VAR: linear from 0 at the first block
      rates = jnp.linspace(0.0, self.drop_path, self.depth)           # (depth,)
    x, _ = self.blocks(x, None, cond, mask, jnp.int32(0), rates)
    return self._head(x, cond)

  def decode(self, cond, inputs, k: int, cache):
    """Runs scale k (static) against the KV cache.

    cond: (B, C) from `condition`; inputs: (B, p_k^2, code_dim) teacher input (ignored for
    k = 0); cache: {'k','v'}: (depth, B, H, L, hd) from `init_cache`. Returns
    (logits (B, p_k^2, V) float32, updated cache). Keys past the end of scale k are masked,
    so unfilled cache slots are never read.
    """
    start, end = scale_bounds(self.scales)[k]
    x = self._start(cond) if k == 0 else self.word_embed(inputs.astype(self.dtype))
    x = x + (self.level_embed[k] + self.pos_embed[start:end]).astype(self.dtype)
    x = _constrain(x)                                                 # (B, n, C)
    mask = (jnp.arange(self.num_tokens) < end)[None, :]               # (1, L)
    x, cache = self.blocks(x, cache, cond, mask, jnp.int32(start), None)
    return self._head(x, cond), cache


def init_cache(model: VAR, batch_size: int, dtype=None):
  """Empty KV cache, {'k','v'}: (depth, B, heads, L, head_dim) (layer axis first, as nn.scan)."""
  shape = (model.depth, batch_size, model.heads, model.num_tokens, model.width // model.heads)
  dt = dtype or model.dtype
  return {'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt)}


def from_config(config, shapes, num_instruments: int, dtype=None) -> VAR:
  """Builds the VAR of `config.autoregressor` for the shapes of `mars_jax.config.derive`."""
  a = config.autoregressor
  if dtype is None:
    dtype = jnp.dtype(a.train.compute_dtype)
  attention = str(a.attention)
  if attention == 'auto':
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    attention = 'cudnn' if half and jax.default_backend() == 'gpu' else 'einsum'
  return VAR(vocab_size=int(config.tokenizer.codebook_size), code_dim=int(shapes.latent[2]),
             scales=tuple(shapes.scales), num_pitches=int(shapes.num_pitches),
             num_instruments=int(num_instruments), depth=int(a.depth),
             width=int(a.width or 64 * a.depth), heads=int(a.heads or a.depth),
             mlp_ratio=float(a.mlp_ratio), label_dropout=float(a.label_dropout), dtype=dtype,
             attention=attention,
             gate_init=float(a.gate_init if a.gate_init > 0 else gate_init_for_depth(a.depth)),
             drop_path=float(a.drop_path if a.drop_path >= 0 else drop_path_for_depth(a.depth)),
             remat=str(a.remat))
