"""Waveform <-> normalised log-magnitude spectrogram, for numpy and jax arrays alike.

One implementation serves `prepare` (numpy, in worker processes) and the model side
(jax, jit), so the stored data and the decoder's inverse agree bit for bit in layout.
Layout: frequency rows, time columns, (..., F, T) with F = n_fft/2 (Nyquist dropped)
and T = samples/hop (last centred frame dropped).
"""
import functools
import math

import numpy as np


def array_module(x):
  """numpy for numpy inputs (and scalars), jax.numpy otherwise: the same code serves both."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp
  return jnp


def hann(n_fft, xp=np):
  """Periodic Hann window (librosa / scipy 'hann' with fftbins=True)."""
  return (0.5 - 0.5 * xp.cos(2 * math.pi * xp.arange(n_fft) / n_fft)).astype(xp.float32)


@functools.lru_cache(maxsize=16)
def frame_indices(n_samples, n_fft, hop):
  """(frames+1, n_fft) sample indices into the centred, zero-padded signal (cached: read-only)."""
  n_frames = 1 + n_samples // hop
  idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
  idx.flags.writeable = False
  return idx


@functools.lru_cache(maxsize=16)
def _scaled_window(n_fft):
  """Hann window times 4/n_fft, so the FFT output needs no extra pass over it (numpy)."""
  w = hann(n_fft) * np.float32(4.0 / n_fft)
  w.flags.writeable = False
  return w


def stft(x, n_fft, hop):
  """Centred STFT with zero padding (librosa's default pad_mode='constant').

  x: (..., N) -> (..., N//hop + 1, n_fft//2 + 1) complex, frames on axis -2.
  Magnitudes are scaled so a full-scale sine peaks near 1: a sine of amplitude A gives
  A*sum(window)/2 = A*n_fft/4 in its bin.
  """
  xp = array_module(x)
  pad = [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)]
  xpad = xp.pad(x.astype(xp.float32), pad)
  if xp is np:  # prepare's hot path: strided view, cached window, scipy's faster float32 rfft
    import scipy.fft
    frames = np.lib.stride_tricks.sliding_window_view(xpad, n_fft, axis=-1)[..., ::hop, :]
    return scipy.fft.rfft(frames * _scaled_window(n_fft), axis=-1)  # (..., T+1, F+1)
  frames = xpad[..., frame_indices(x.shape[-1], n_fft, hop)]  # (..., T+1, n_fft)
  return xp.fft.rfft(frames * hann(n_fft, xp), axis=-1) * (4.0 / n_fft)


def magnitude(x, n_fft, hop):
  """(..., N) -> (..., F, T) magnitude with Nyquist bin and last frame dropped."""
  xp = array_module(x)
  mag = xp.abs(stft(x, n_fft, hop))[..., :-1, :-1]  # (..., T, F)
  return xp.swapaxes(mag, -1, -2).astype(xp.float32)


def norm_constants(spec_cfg):
  """Fixed constants (never batch statistics) mapping log-magnitude to [-1, 1]."""
  lo = math.log(spec_cfg.log_eps)
  hi = float(spec_cfg.log_max)
  return lo, hi


def normalise(mag, spec_cfg):
  """magnitude -> log(mag + eps) -> [-1, 1] (values above log_max are clipped)."""
  xp = array_module(mag)
  lo, hi = norm_constants(spec_cfg)
  logmag = xp.log(mag + spec_cfg.log_eps)
  return xp.clip(2.0 * (logmag - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(xp.float32)


def denormalise(y, spec_cfg):
  """Exact inverse of `normalise` on [-1, 1]: back to magnitude (>= 0)."""
  xp = array_module(y)
  lo, hi = norm_constants(spec_cfg)
  logmag = (y.astype(xp.float32) + 1.0) * 0.5 * (hi - lo) + lo
  return xp.maximum(xp.exp(logmag) - spec_cfg.log_eps, 0.0)


def spectrogram(wave, spec_cfg):
  """(..., N) waveform -> (..., F, T) normalised log-magnitude in [-1, 1]."""
  return normalise(magnitude(wave, spec_cfg.n_fft, spec_cfg.hop), spec_cfg)
