"""Front end: librosa-compatible STFT, the 512 x 512 NSynth shape, normalisation round trip."""
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax import defaults
from mars_jax.audio import spectrogram as sp


def _noise(n, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)


@pytest.mark.parametrize('n_fft,hop,n', [(256, 64, 4096), (1024, 125, 16000)])
def test_magnitude_matches_librosa(n_fft, hop, n):
  x = _noise(n)
  ref = np.abs(librosa.stft(x, n_fft=n_fft, hop_length=hop, window='hann', center=True,
                            pad_mode='constant')) * (4.0 / n_fft)  # (F+1, T+1)
  mag = sp.magnitude(x, n_fft, hop)
  assert mag.shape == (n_fft // 2, n // hop)
  np.testing.assert_allclose(mag, ref[:-1, :-1], rtol=1e-4, atol=1e-5)


def test_nsynth_default_shape():
  c = defaults.get_config()
  shapes = config_lib.derive(c)
  assert shapes.n_samples == 64000 and shapes.spectrogram == (512, 512)
  x = _noise(shapes.n_samples)
  assert sp.magnitude(x, c.spectrogram.n_fft, c.spectrogram.hop).shape == (512, 512)
  assert sp.spectrogram(x, c.spectrogram).shape == (512, 512)


def test_tiny_shape(tiny_config):
  shapes = config_lib.derive(tiny_config)
  x = _noise(shapes.n_samples)[None]
  assert sp.spectrogram(x, tiny_config.spectrogram).shape == (1, 128, 128)
  assert shapes.spectrogram == (128, 128)


def test_full_scale_sine_peaks_near_one():
  sr, n_fft, hop = 16000, 1024, 125
  k = 64  # bin-centred frequency: no scalloping loss
  t = np.arange(16000) / sr
  x = np.sin(2 * np.pi * (k * sr / n_fft) * t).astype(np.float32)
  mag = sp.magnitude(x, n_fft, hop)
  mid = mag[:, 10:-10]  # frames away from the zero-padded edges
  np.testing.assert_allclose(mid.max(axis=0), 1.0, atol=1e-3)
  assert np.all(mid.argmax(axis=0) == k)
  half = sp.magnitude(0.5 * x, n_fft, hop)[:, 10:-10]
  np.testing.assert_allclose(half.max(), 0.5, atol=1e-3)


def test_normalise_round_trip():
  s = defaults.get_config().spectrogram
  y = np.linspace(-1, 1, 1001, dtype=np.float32)
  np.testing.assert_allclose(sp.normalise(sp.denormalise(y, s), s), y, atol=2e-5)
  lo, hi = sp.norm_constants(s)
  mag = np.exp(np.linspace(lo + 2, hi - 0.01, 500)).astype(np.float32)  # inside the mapped range
  np.testing.assert_allclose(sp.denormalise(sp.normalise(mag, s), s), mag, rtol=1e-4, atol=1e-7)


def test_normalise_range_and_clipping():
  s = defaults.get_config().spectrogram
  mag = np.concatenate([np.zeros(3), np.logspace(-8, 3, 200)]).astype(np.float32)
  y = sp.normalise(mag, s)
  assert y.min() >= -1 and y.max() <= 1
  assert y[0] == pytest.approx(-1.0)
  assert y[-1] == 1.0  # above log_max: clipped
  assert np.all(np.diff(y) >= 0)
  assert np.all(sp.denormalise(np.float32([-1.0]), s) >= 0)


def test_numpy_and_jax_agree():
  s = defaults.get_config().spectrogram
  x = _noise(2 * 16000, seed=1).reshape(2, 16000)
  a = sp.spectrogram(x, s)
  b = jax.jit(lambda w: sp.spectrogram(w, s))(jnp.asarray(x))
  assert isinstance(a, np.ndarray) and isinstance(b, jax.Array)
  assert a.dtype == np.float32 and b.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(b), a, atol=1e-4)
  np.testing.assert_allclose(np.asarray(sp.denormalise(jnp.asarray(a), s)), sp.denormalise(a, s),
                             rtol=1e-5, atol=1e-7)
