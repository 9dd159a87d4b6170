"""Multi-scale VQ tokenizer over CMX spectrogram images (VAR-style conv encoder/decoder).

Build: `Tokenizer.from_config(config.tokenizer, derive(config), dtype=jnp.float32)`.
Use any method through `model.apply(variables, ..., method=Tokenizer.<name>)` (or the name
as a string); parameters are always float32, `dtype` is the compute dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mars_jax.models.layers import AttnBlock, Conv, Downsample, Norm, ResBlock, Upsample
from mars_jax.models.quantizer import MultiScaleQuantizer

Dtype = Any


class Encoder(nn.Module):
  """conv_in -> per level num_res_blocks ResBlocks (+downsample) -> mid (attention) -> latent."""
  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  groups: int = 32
  latent_channels: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, C) -> (B, H/2^L, W/2^L, latent)
    h = Conv(self.channels * self.channel_mult[0], dtype=self.dtype, name='conv_in')(
        x.astype(self.dtype))
    last = len(self.channel_mult) - 1
    for i, m in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.channels * m, self.groups, self.dropout, self.dtype,
                     name=f'down_{i}_block_{j}')(h, train)
        if i == last:  # attention only at the lowest resolution
          h = AttnBlock(self.groups, self.dtype, name=f'down_{i}_attn_{j}')(h)
      if i != last:
        h = Downsample(self.dtype, name=f'down_{i}_sample')(h)
    width = h.shape[-1]
    h = ResBlock(width, self.groups, self.dropout, self.dtype, name='mid_block_1')(h, train)
    h = AttnBlock(self.groups, self.dtype, name='mid_attn')(h)
    h = ResBlock(width, self.groups, self.dropout, self.dtype, name='mid_block_2')(h, train)
    h = nn.silu(Norm(self.groups, self.dtype, name='norm_out')(h))
    return Conv(self.latent_channels, dtype=self.dtype, name='conv_out')(h)


class Decoder(nn.Module):
  """Mirror of the encoder; linear output (data already lies in [-1, 1], no tanh)."""
  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  groups: int = 32
  out_channels: int = 64
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = False):  # (B, h, w, latent) -> (B, H, W, out_channels)
    last = len(self.channel_mult) - 1
    width = self.channels * self.channel_mult[-1]
    h = Conv(width, dtype=self.dtype, name='conv_in')(z.astype(self.dtype))
    h = ResBlock(width, self.groups, self.dropout, self.dtype, name='mid_block_1')(h, train)
    h = AttnBlock(self.groups, self.dtype, name='mid_attn')(h)
    h = ResBlock(width, self.groups, self.dropout, self.dtype, name='mid_block_2')(h, train)
    for i in reversed(range(len(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResBlock(self.channels * self.channel_mult[i], self.groups, self.dropout, self.dtype,
                     name=f'up_{i}_block_{j}')(h, train)
        if i == last:
          h = AttnBlock(self.groups, self.dtype, name=f'up_{i}_attn_{j}')(h)
      if i != 0:
        h = Upsample(self.dtype, name=f'up_{i}_sample')(h)
    h = nn.silu(Norm(self.groups, self.dtype, name='norm_out')(h))
    # Image channels (1 without CMX) need not divide the mesh: leave the out axis unsharded.
    return Conv(self.out_channels, out_axis=None, dtype=self.dtype, name='conv_out')(h)


class Tokenizer(nn.Module):
  """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder."""
  image_channels: int
  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  groups: int = 32
  latent_channels: int = 32
  codebook_size: int = 4096
  scales: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  lookup: str = 'l2'
  beta: float = 0.25
  num_phi: int = 4
  phi_ratio: float = 0.5
  quant_dropout: float = 0.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, tcfg, shapes, dtype=jnp.float32) -> 'Tokenizer':
    """tcfg: config.tokenizer; shapes: mars_jax.config.derive(config)."""
    return cls(
        image_channels=shapes.image[-1], channels=tcfg.channels,
        channel_mult=tuple(tcfg.channel_mult), num_res_blocks=tcfg.num_res_blocks,
        groups=tcfg.groups, latent_channels=shapes.latent[-1], codebook_size=tcfg.codebook_size,
        scales=tuple(shapes.scales), lookup=tcfg.lookup, beta=tcfg.beta, num_phi=tcfg.num_phi,
        phi_ratio=tcfg.phi_ratio, quant_dropout=tcfg.quant_dropout, dtype=dtype)

  def setup(self):
    common = dict(channels=self.channels, channel_mult=tuple(self.channel_mult),
                  num_res_blocks=self.num_res_blocks, groups=self.groups, dropout=self.dropout,
                  dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.image_channels, **common)
    # The quantizer's convolutions at full float32 precision on every backend (TPU/GPU would
    # use bf16 passes by default), so tokens do not depend on where the tokenizer runs.
    hi = jax.lax.Precision.HIGHEST
    self.quant_conv = Conv(self.latent_channels, dtype=jnp.float32, precision=hi)
    self.post_quant_conv = Conv(self.latent_channels, dtype=jnp.float32, precision=hi)
    self.quantizer = MultiScaleQuantizer(
        codebook_size=self.codebook_size, dim=self.latent_channels, scales=tuple(self.scales),
        num_phi=self.num_phi, phi_ratio=self.phi_ratio, beta=self.beta, lookup=self.lookup,
        quant_dropout=self.quant_dropout)

  # -- image <-> latent -------------------------------------------------------
  def encode(self, x, train: bool = False):
    """Image (B, H, W, C) -> continuous latent f (B, h, w, d), float32."""
    return self.quant_conv(self.encoder(x, train).astype(jnp.float32))

  def fhat_to_image(self, f_hat, train: bool = False):
    """Quantized latent (B, h, w, d) -> reconstruction (B, H, W, C), float32."""
    return self.decoder(self.post_quant_conv(f_hat.astype(jnp.float32)), train).astype(jnp.float32)

  def __call__(self, x, train: bool = False):
    """(B, H, W, C) -> (recon (B, H, W, C) float32, aux). With train and quant_dropout>0,
    pass rngs={'dropout': key}."""
    f = self.encode(x, train)
    f_st, aux = self.quantizer(f, deterministic=not train)
    return self.fhat_to_image(f_st, train), aux

  # -- token side ---------------------------------------------------------------
  def encode_tokens(self, x):
    """Image -> list of (B, p_k, p_k) int32 token maps."""
    return self.quantizer.encode_tokens(self.encode(x))

  def decode_tokens(self, tokens_list):
    """List of token maps -> reconstruction (B, H, W, C)."""
    return self.fhat_to_image(self.quantizer.idx_to_fhat(tokens_list))

  def idx_to_fhat(self, tokens_list):
    return self.quantizer.idx_to_fhat(tokens_list)

  def idx_to_teacher_inputs(self, tokens_list):
    return self.quantizer.idx_to_teacher_inputs(tokens_list)

  def next_input(self, k: int, f_hat, tokens_k):
    return self.quantizer.next_input(k, f_hat, tokens_k)

  def lookup_codes(self, idx):
    return self.quantizer.lookup_codes(idx)


# ------------------------------------------------------------------------------ losses

def reconstruction_loss(recon, x, cfg):
  """(l1_weight * L1 + l2_weight * L2, L1, L2) between images in the normalised log-magnitude
  domain ([-1, 1], -1 = the noise floor), cfg is config.tokenizer.

  With cfg.level_weight = a > 0 each value's error counts 1 + a * (x + 1) / 2 times (a weighted
  mean): the loud bins, the harmonics that carry the pitch, weigh up to 1 + a times as much as the
  floor, where an error is inaudible. a = 0 is the plain mean.
  """
  x = x.astype(jnp.float32)
  err = recon.astype(jnp.float32) - x
  a = float(cfg.get('level_weight', 0.0) or 0.0)
  if a:
    w = 1.0 + a * (x + 1.0) * 0.5
    mean = lambda v: jnp.sum(w * v) / jnp.sum(w)
  else:
    mean = jnp.mean
  l1, l2 = mean(jnp.abs(err)), mean(jnp.square(err))
  return cfg.l1_weight * l1 + cfg.l2_weight * l2, l1, l2


def tokenizer_loss(recon, x, aux, cfg):
  """Composite reconstruction loss; cfg is config.tokenizer. Returns (loss, metrics)."""
  rec, l1, l2 = reconstruction_loss(recon, x, cfg)
  vq = aux['vq_loss']
  loss = rec + cfg.vq_weight * vq
  metrics = dict(loss=loss, l1=l1, l2=l2, vq_loss=vq)
  for k in range(aux['usage'].shape[0]):
    metrics[f'usage_{k}'] = aux['usage'][k]
    metrics[f'perplexity_{k}'] = aux['perplexity'][k]
  return loss, metrics


class PatchDiscriminator(nn.Module):
  """PatchGAN (VQGAN's NLayerDiscriminator) with GroupNorm instead of BatchNorm: one logit per
  patch."""
  channels: int = 64
  num_layers: int = 3
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, H', W', 1)
    h = Conv(self.channels, kernel_size=4, strides=2, padding=1, dtype=self.dtype)(
        x.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    for i in range(1, self.num_layers + 1):
      width = self.channels * min(2 ** i, 8)
      stride = 2 if i < self.num_layers else 1
      h = Conv(width, kernel_size=4, strides=stride, padding=1, dtype=self.dtype)(h)
      h = nn.leaky_relu(Norm(min(self.groups, width), self.dtype)(h), 0.2)
    return Conv(1, kernel_size=4, padding=1, out_axis=None, dtype=self.dtype)(h).astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  """Generator hinge loss."""
  return -jnp.mean(logits_fake)


def adaptive_gan_weight(rec_grad_norm, gan_grad_norm, max_weight: float = 1e4):
  """VQGAN's lambda = ||grad rec|| / (||grad gan|| + 1e-4), norms taken at the decoder's last layer
    (params['decoder']['conv_out']['kernel']); no gradient flows through the weight."""
  w = rec_grad_norm / (gan_grad_norm + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
