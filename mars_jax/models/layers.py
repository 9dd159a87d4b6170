"""Convolutional building blocks shared by the tokenizer's encoder and decoder (NHWC).

Every parameter carries logical axis names (see `config.mesh.rules`) so the engine
can shard any model built from these blocks without knowing its structure.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical names: conv kernels (kh, kw, in, out), biases and norm parameters.
CONV_KERNEL = (None, None, 'conv_in', 'conv_out')
CONV_BIAS = ('conv_out',)
NORM = (None,)


def conv_init(names=CONV_KERNEL):
  """He-style fan-in init (PyTorch conv default scale) with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                                      names)


# The standard deviation of a unit normal truncated to [-2, 2]: jax's truncated_normal
# initializer scales by the untruncated std, so its samples come out 12% too small.
_TRUNC2_STD = 0.8796256610342398


def trunc_normal(std):
  """Normal init truncated at 2 standard deviations whose samples HAVE standard deviation `std`
  (as torch's trunc_normal_(std=...) does for small std, what VAR's init values assume)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * (std / _TRUNC2_STD)
  return init


class Conv(nn.Module):
  """Conv2d with named parameters; `out_axis=None` when `features` may not divide the mesh.
  `precision`: jax.lax.Precision for the convolution (HIGHEST keeps float32 on TPU/GPU)."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Any = 'SAME'
  out_axis: Optional[str] = 'conv_out'
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):  # (B, H, W, Cin) -> (B, H', W', features)
    k = self.kernel_size
    return nn.Conv(
        self.features, (k, k), strides=(self.strides, self.strides), padding=self.padding,
        dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
        kernel_init=conv_init((None, None, 'conv_in', self.out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (self.out_axis,)))(x)


class Norm(nn.Module):
  """GroupNorm with named affine parameters; statistics in float32 whatever the compute dtype."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C)
    y = nn.GroupNorm(
        num_groups=self.groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, NORM),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, NORM))(x.astype(jnp.float32))
    return y.astype(self.dtype)


class ResBlock(nn.Module):
  """Pre-activation ResNet block: (GroupNorm, SiLU, conv3x3) x 2, plus a 1x1 shortcut if widths
  differ."""
  features: int
  groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, Cin) -> (B, H, W, features)
    h = nn.silu(Norm(self.groups, self.dtype)(x))
    h = Conv(self.features, dtype=self.dtype)(h)
    h = nn.silu(Norm(self.groups, self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.features, dtype=self.dtype)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, kernel_size=1, dtype=self.dtype, name='shortcut')(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 conv3x3 with VAR's asymmetric (0,1) padding, so H -> H/2 exactly."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, H/2, W/2, C)
    return Conv(x.shape[-1], strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv3x3 (avoids the checkerboard of transposed convs)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, 2H, 2W, C)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], dtype=self.dtype)(x)


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions; used only at the lowest resolution."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C)
    b, hh, ww, c = x.shape
    h = Norm(self.groups, self.dtype)(x).reshape(b, hh * ww, c)  # (B, N, C)

    def dense(name, names, bias=True):
      return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name, use_bias=bias,
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'), names),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))

    q = dense('q', ('embed', 'heads'))(h)
    # No key bias (as in VAR): q.(k + b) shifts every logit of a query equally, so softmax
    # ignores it and its gradient is rounding noise that Adam would blow up to full-size steps.
    k = dense('k', ('embed', 'heads'), bias=False)(h)
    v = dense('v', ('embed', 'heads'))(h)
    logits = jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32) / jnp.sqrt(c)  # (B, N, N)
    w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum('bqk,bkc->bqc', w, v)
    o = dense('proj', ('heads', 'embed'))(o)
    return x + o.reshape(b, hh, ww, c)
