"""Small conv net classifiers (pitch, instrument) whose embeddings the metrics use.

No pretrained audio network can be fetched offline, so the evaluation trains its own:
the penultimate activation is the embedding for KID, FD and memorisation, the softmax
the p(y|x) for the inception scores.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def _conv(features, strides, name):
  return nn.Conv(features, (3, 3), strides=strides, padding='SAME', name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')))


class Classifier(nn.Module):
  """(B, H, W, C) spectrogram image -> (logits (B, classes), embedding (B, D))."""
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    for i, w in enumerate(self.widths):
      x = _conv(w, 1, f'conv{i}a')(x)
      x = nn.silu(nn.GroupNorm(num_groups=min(self.groups, w), dtype=self.dtype)(x))
      x = _conv(w, 2, f'conv{i}b')(x)  # halves H and W
      x = nn.silu(nn.GroupNorm(num_groups=min(self.groups, w), dtype=self.dtype)(x))
    emb = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)  # (B, D)
    logits = nn.Dense(self.num_classes, name='head', kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('embed', 'vocab')))(emb)
    return logits, emb
