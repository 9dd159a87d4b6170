"""Channel multiplexing (CMX): a large spectrogram as a small many-channel image.

Every r x r block of (frequency, time) cells becomes the r*r channels of one pixel:
space-to-depth over both axes at once. It only moves values, so `uncmx(cmx(x))` is
bit-exact. `truncate` is the lossy alternative the paper ablates against: keep the
lowest F/r bins and the first T/r frames.
"""
import einops
import numpy as np


def _xp(x):
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp
  return jnp


def cmx(x, r):
  """(..., F, T) -> (..., F/r, T/r, r*r); channel index = i*r + j for offset (i, j) in the block."""
  return einops.rearrange(x, '... (h i) (w j) -> ... h w (i j)', i=r, j=r)


def uncmx(y, r):
  """(..., H, W, r*r) -> (..., H*r, W*r); exact inverse of `cmx`."""
  return einops.rearrange(y, '... h w (i j) -> ... (h i) (w j)', i=r, j=r)


def truncate(x, height, width):
  """(..., F, T) -> (..., height, width, 1): low frequencies, first frames; loses the rest."""
  return x[..., :height, :width, None]


def untruncate(y, freq, frames, fill=-1.0):
  """(..., h, w, 1) -> (..., freq, frames), the cut-off part filled with `fill` (silence)."""
  xp = _xp(y)
  y = y[..., 0]
  pad = [(0, 0)] * (y.ndim - 2) + [(0, freq - y.shape[-2]), (0, frames - y.shape[-1])]
  return xp.pad(y, pad, constant_values=fill)


def to_image(spec, cmx_cfg):
  """Spectrogram (..., F, T) -> tokenizer input (..., H, W, C) per `cmx.mode`."""
  r = cmx_cfg.factor
  if cmx_cfg.mode == 'cmx':
    return cmx(spec, r)
  if cmx_cfg.mode == 'truncate':
    return truncate(spec, spec.shape[-2] // r, spec.shape[-1] // r)
  return spec[..., None]


def from_image(img, cmx_cfg, freq, frames):
  """Inverse of `to_image` (exact for 'cmx' and 'none'; silence-filled for 'truncate')."""
  if cmx_cfg.mode == 'cmx':
    return uncmx(img, cmx_cfg.factor)
  if cmx_cfg.mode == 'truncate':
    return untruncate(img, freq, frames)
  return img[..., 0]
