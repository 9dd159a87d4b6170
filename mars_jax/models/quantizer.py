"""VAR's multi-scale residual quantizer with ONE codebook shared by all scales.

A latent map f (B, h, w, d) becomes K token maps of sides p_1 < ... < p_K = h. Scale k
quantizes the area-downsampled residual, upsamples its code map (PyTorch-style bicubic)
back to h x w, refines it with a shared 3x3 conv phi, and adds it to f_hat. The resampling
operators reproduce PyTorch's `F.interpolate(mode='area'|'bicubic')` exactly, because
`jax.image.resize` implements neither: 'area' there is not adaptive average pooling and
'cubic' uses the Keys a=-0.5 kernel where PyTorch uses a=-0.75.

The quantizer always computes in float32 (token choice must not depend on compute dtype).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mars_jax.models.layers import Conv

HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- resampling

@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) adaptive-average-pooling weights: row i averages
  [floor(i*n/p), ceil((i+1)*n/p))."""
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m.astype(np.float32)


def _cubic(t, a):
  """PyTorch's cubic convolution kernel (upsample_bicubic2d), distance t >= 0."""
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) weights of PyTorch bicubic, align_corners=False, border taps clamped."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for j in range(n_out):
    src = (j + 0.5) * scale - 0.5      # not clamped for cubic (PyTorch semantics)
    x0 = int(np.floor(src))
    t = src - x0
    for tap in range(-1, 3):
      idx = min(max(x0 + tap, 0), n_in - 1)
      m[j, idx] += float(_cubic(t - tap, a))
  return m.astype(np.float32)


def area_downsample(x, p):
  """PyTorch `F.interpolate(x, (p, p), mode='area')` in NHWC: (B, H, W, C) -> (B, p, p, C)."""
  ph, pw = (p, p) if isinstance(p, int) else p
  _, h, w, _ = x.shape
  if (ph, pw) == (h, w):
    return x
  ah, aw = jnp.asarray(area_matrix(h, ph)), jnp.asarray(area_matrix(w, pw))
  return jnp.einsum('ph,qw,bhwc->bpqc', ah, aw, x, precision=HIGHEST)


def upsample_bicubic(x, size):
  """PyTorch `F.interpolate(x, size, mode='bicubic')` (a=-0.75) in NHWC."""
  sh, sw = (size, size) if isinstance(size, int) else size
  _, h, w, _ = x.shape
  if (sh, sw) == (h, w):
    return x
  mh, mw = jnp.asarray(bicubic_matrix(h, sh)), jnp.asarray(bicubic_matrix(w, sw))
  return jnp.einsum('ph,qw,bhwc->bpqc', mh, mw, x, precision=HIGHEST)


def phi_index(k: int, num_scales: int, num_phi: int) -> int:
  """VAR's PhiPartiallyShared: scale k uses the phi whose tick is nearest to k/(K-1)."""
  ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)  # VAR's exact floats
  at = k / (num_scales - 1) if num_scales > 1 else 0.0
  return int(np.argmin(np.abs(ticks - at)))


# --------------------------------------------------------------------------- lookup / codebook

def _l2_normalize(x, eps=1e-6):
  """Safe normalisation: zero residuals (common at fine scales) map to 0, not NaN."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def nearest_code(z, codebook, lookup: str = 'l2'):
  """Index of the nearest code for each row of z (N, d); no gradient flows through the choice."""
  z = jax.lax.stop_gradient(z.astype(jnp.float32))
  e = jax.lax.stop_gradient(codebook.astype(jnp.float32))
  if lookup == 'cosine':
    # Compare directions only; the raw code (with its learned norm) is what gets added,
    # so residual magnitudes stay meaningful even in a 16-32 dim code space.
    score = jnp.einsum('nd,vd->nv', _l2_normalize(z), _l2_normalize(e), precision=HIGHEST)
    return jnp.argmax(score, axis=-1).astype(jnp.int32)
  dist = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)[None]
          - 2 * jnp.einsum('nd,vd->nv', z, e, precision=HIGHEST))  # (N, V)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def code_stats(idx, codebook_size: int):
  """Counts (V,), used fraction and perplexity of the codes in idx."""
  counts = jnp.zeros((codebook_size,), jnp.float32).at[idx.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return counts, jnp.mean(counts > 0), jnp.exp(ent)


def reseed_dead_codes(codebook, usage_counts, candidates, rng, threshold: float = 0.0):
  """Replaces codes used <= threshold times in the tracked window by random candidates.

  codebook (V, d); usage_counts (..., V) summed over leading axes (e.g. per scale);
  candidates (N, d) encoder outputs / residuals. Static shapes, so it runs inside jit.
  Live codes are returned bit-exactly.
  """
  v = codebook.shape[0]
  n = candidates.shape[0]
  counts = usage_counts.reshape(-1, v).sum(0)
  dead = counts <= threshold  # (V,)
  if n >= v:  # distinct candidates when there are enough of them
    pick = jax.random.permutation(rng, n)[:v]
  else:
    pick = jax.random.randint(rng, (v,), 0, n)
  new = candidates[pick].astype(codebook.dtype)  # (V, d)
  return jnp.where(dead[:, None], new, codebook)


# --------------------------------------------------------------------------- module

class MultiScaleQuantizer(nn.Module):
  """Residual VQ over a schedule of square scales with one shared codebook (VAR / ImageFolder)."""
  codebook_size: int
  dim: int
  scales: Sequence[int]
  num_phi: int = 4
  phi_ratio: float = 0.5
  beta: float = 0.25
  lookup: str = 'l2'
  quant_dropout: float = 0.0

  def setup(self):
    self.codebook = self.param(
        'codebook',
        nn.with_logical_partitioning(nn.initializers.normal(1.0 / np.sqrt(self.dim)),
                                     ('codes', None)),
        (self.codebook_size, self.dim), jnp.float32)
    self.phis = [Conv(self.dim, kernel_size=3, precision=HIGHEST) for _ in range(self.num_phi)]

  # -- pieces -------------------------------------------------------------
  def lookup_codes(self, idx):
    """Token ids (...) -> code vectors (..., d)."""
    return jnp.take(self.codebook, idx, axis=0)

  def phi(self, k: int, h):
    """phi_k(h) = (1-r) h + r conv3x3(h), the conv shared by neighbouring scales."""
    if abs(self.phi_ratio) < 1e-6:
      return h
    conv = self.phis[phi_index(k, len(self.scales), self.num_phi)]
    return (1 - self.phi_ratio) * h + self.phi_ratio * conv(h)

  def _scale_update(self, k: int, idx, size):
    """Code map of scale k (B, p, p) -> its contribution to f_hat (B, h, w, d)."""
    h = self.lookup_codes(idx)  # (B, p, p, d)
    if k < len(self.scales) - 1:
      h = upsample_bicubic(h, size)
    return self.phi(k, h)

  def _latent_side(self):
    return self.scales[-1]

  # -- training forward ---------------------------------------------------
  def __call__(self, f, deterministic: bool = True):
    """f (B, h, w, d) -> (straight-through f_hat, aux). Dropout rng stream: 'dropout'."""
    f = f.astype(jnp.float32)
    b, hh, ww, d = f.shape
    num = len(self.scales)
    f_sg = jax.lax.stop_gradient(f)
    rest = f_sg
    f_hat = jnp.zeros_like(f)

    use_drop = (not deterministic) and self.quant_dropout > 0
    if use_drop:
      r1, r2 = jax.random.split(self.make_rng('dropout'))
      stop = jnp.where(jax.random.uniform(r1, (b,)) < self.quant_dropout,
                       jax.random.randint(r2, (b,), 0, num), num - 1)  # last kept scale
      keep = (jnp.arange(num)[None, :] <= stop[:, None]).astype(jnp.float32)  # (B, K)
    else:
      keep = jnp.ones((b, num), jnp.float32)

    tokens, counts, usage, perplexity, residuals = [], [], [], [], []
    loss_sum = jnp.zeros((b,), jnp.float32)
    for k, p in enumerate(self.scales):
      z = area_downsample(rest, p) if k < num - 1 else rest  # (B, p, p, d)
      idx = nearest_code(z.reshape(-1, d), self.codebook, self.lookup).reshape(b, p, p)
      h = self._scale_update(k, idx, (hh, ww))  # (B, h, w, d)
      if use_drop:
        h = h * keep[:, k, None, None, None]
      f_hat = f_hat + h
      rest = rest - jax.lax.stop_gradient(h)
      commit = jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f), axis=(1, 2, 3))
      codeb = jnp.mean(jnp.square(f_hat - f_sg), axis=(1, 2, 3))
      loss_sum = loss_sum + keep[:, k] * (self.beta * commit + codeb)
      c, u, ppl = code_stats(idx, self.codebook_size)
      tokens.append(idx)
      counts.append(c)
      usage.append(u)
      perplexity.append(ppl)
      residuals.append(z.reshape(-1, d))

    vq_loss = jnp.sum(loss_sum) / jnp.sum(keep)  # = mean over scales and batch without dropout
    f_st = f + jax.lax.stop_gradient(f_hat - f)
    aux = dict(
        vq_loss=vq_loss,
        tokens=tokens,                       # list of (B, p_k, p_k) int32
        f_hat=f_hat,                         # (B, h, w, d), with gradient to codebook/phi
        usage=jnp.stack(usage),              # (K,) fraction of codes used in the batch
        perplexity=jnp.stack(perplexity),    # (K,)
        code_counts=jnp.stack(counts),       # (K, V) hits, for dead-code tracking
        residuals=jax.lax.stop_gradient(jnp.concatenate(residuals)),  # (B*sum p^2, d) reseed pool
    )
    return f_st, aux

  # -- token-side functions (autoregressor, sampler) ------------------------
  def encode_tokens(self, f):
    """f (B, h, w, d) -> list of (B, p_k, p_k) token maps (no gradient, no dropout)."""
    _, aux = self(jax.lax.stop_gradient(f), deterministic=True)
    return aux['tokens']

  def idx_to_fhat(self, tokens_list):
    """Token maps (each (B, p_k, p_k) or (B, p_k^2)) -> f_hat (B, h, w, d)."""
    side = self._latent_side()
    f_hat = None
    for k, (p, t) in enumerate(zip(self.scales, tokens_list)):
      h = self._scale_update(k, t.reshape(t.shape[0], p, p), (side, side))
      f_hat = h if f_hat is None else f_hat + h
    return f_hat

  def idx_to_teacher_inputs(self, tokens_list):
    """VAR's idxBl_to_var_input: (B, sum_{k>=2} p_k^2, d) area-downsampled cumulative f_hat."""
    b = tokens_list[0].shape[0]
    side = self._latent_side()
    f_hat = jnp.zeros((b, side, side, self.dim), jnp.float32)
    outs = []
    for k in range(len(self.scales) - 1):
      f_hat, nxt = self.next_input(k, f_hat, tokens_list[k])
      outs.append(nxt)
    if not outs:
      return jnp.zeros((b, 0, self.dim), jnp.float32)
    return jnp.concatenate(outs, axis=1)

  def next_input(self, k: int, f_hat, tokens_k):
    """VAR's get_next_autoregressive_input: add scale k's tokens to f_hat and return the
    input for scale k+1, (B, p_{k+1}^2, d), or None after the last scale. k is static."""
    p = self.scales[k]
    b = tokens_k.shape[0]
    side = self._latent_side()
    f_hat = f_hat + self._scale_update(k, tokens_k.reshape(b, p, p), (side, side))
    if k == len(self.scales) - 1:
      return f_hat, None
    q = self.scales[k + 1]
    return f_hat, area_downsample(f_hat, q).reshape(b, q * q, self.dim)
