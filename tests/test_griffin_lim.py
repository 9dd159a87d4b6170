"""Griffin-Lim in JAX: exact istft, librosa-level quality, batch independence."""
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax.audio import griffin_lim as gl
from mars_jax.audio import spectrogram as sp


def notes(n, sr, n_samples, seed=0):
  """NSynth-like notes: decaying harmonics (higher ones faster), an attack and noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(n_samples) / sr
  out = []
  for _ in range(n):
    f0 = librosa.midi_to_hz(rng.integers(48, 72))
    decay = rng.uniform(1, 6)
    y = sum(rng.uniform(0.2, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
            * np.exp(-decay * np.sqrt(k) * t) for k in range(1, 12) if f0 * k < sr / 2)
    y = y * np.minimum(1, t / 0.01) + 0.01 * rng.standard_normal(n_samples) * np.exp(-8 * t)
    out.append(0.8 * y / np.abs(y).max())
  return np.stack(out).astype(np.float32)  # (n, n_samples)


@pytest.mark.parametrize('n_fft,hop,n', [(256, 64, 4096), (1024, 125, 16000)])
def test_istft_inverts_stft(n_fft, hop, n):
  x = np.random.default_rng(0).uniform(-1, 1, (2, n)).astype(np.float32)
  spec = sp.stft(jnp.asarray(x), n_fft, hop)  # (2, n//hop + 1, n_fft//2 + 1)
  y = jax.jit(gl.istft, static_argnums=(1, 2, 3))(spec, n_fft, hop, n)
  assert y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), x, atol=1e-5)
  # A shorter length crops.
  short = jax.jit(gl.istft, static_argnums=(1, 2, 3))(spec, n_fft, hop, n - 7)
  np.testing.assert_allclose(np.asarray(short), x[:, :n - 7], atol=1e-5)


@pytest.fixture
def tiny_notes(tiny_config):
  c = tiny_config
  s = c.spectrogram
  shapes = config_lib.derive(c)
  x = notes(3, s.sample_rate, shapes.n_samples)
  mag = sp.magnitude(x, s.n_fft, s.hop)  # (3, 128, 128)
  return s, shapes, mag


@pytest.mark.parametrize('momentum', [0.0, 0.99])
def test_quality_matches_librosa(tiny_notes, momentum):
  """Same algorithm, same input, same start (zero phase), same iterations: JAX >= librosa."""
  s, shapes, mag = tiny_notes
  n_iter = s.griffin_lim_iters
  wave = gl.griffin_lim(jnp.asarray(mag), s.n_fft, s.hop, shapes.n_samples, n_iter, momentum)
  assert wave.shape == (3, shapes.n_samples)
  sc = np.asarray(gl.spectral_convergence(mag, np.asarray(wave), s.n_fft, s.hop))
  # librosa gets the identical full magnitude (Nyquist + last frame restored), unscaled.
  full = np.swapaxes(np.asarray(gl.restore(mag)), -1, -2) * (s.n_fft / 4.0)  # (3, F+1, T+1)
  ref = np.stack([librosa.griffinlim(f, n_iter=n_iter, hop_length=s.hop, n_fft=s.n_fft,
                                     window='hann', center=True, pad_mode='constant',
                                     momentum=momentum, init=None, length=shapes.n_samples)
                  for f in full]).astype(np.float32)
  sc_ref = gl.spectral_convergence(mag, ref, s.n_fft, s.hop)
  assert np.all(sc <= sc_ref * 1.01 + 1e-4), (sc, sc_ref)
  assert np.all(sc < 0.5)  # a real reconstruction, not a coincidence of two failures
  if momentum:
    classic = gl.griffin_lim(jnp.asarray(mag), s.n_fft, s.hop, shapes.n_samples, n_iter, 0.0)
    sc0 = np.asarray(gl.spectral_convergence(mag, np.asarray(classic), s.n_fft, s.hop))
    assert np.mean(sc) < np.mean(sc0)  # momentum helps at a fixed iteration count


def test_more_iterations_and_random_phase(tiny_notes):
  s, shapes, mag = tiny_notes
  m = jnp.asarray(mag[:1])
  key = jax.random.PRNGKey(0)
  sc = [float(gl.spectral_convergence(
            mag[:1], gl.griffin_lim(m, s.n_fft, s.hop, shapes.n_samples, k, 0.99, key), s.n_fft,
            s.hop)[0])
        for k in (4, 32)]
  assert sc[1] < sc[0] < 1.0


def test_batched_equals_per_item(tiny_notes):
  s, shapes, mag = tiny_notes
  batch = np.asarray(gl.griffin_lim(jnp.asarray(mag), s.n_fft, s.hop, shapes.n_samples, 8))
  for i in range(len(mag)):
    one = np.asarray(gl.griffin_lim(jnp.asarray(mag[i:i + 1]), s.n_fft, s.hop, shapes.n_samples, 8))
    np.testing.assert_allclose(batch[i], one[0], atol=1e-5)


def test_to_audio(tiny_notes):
  s, shapes, mag = tiny_notes
  norm = sp.normalise(mag, s)
  wave = gl.to_audio(norm, s, n_iter=16)
  assert wave.shape == (3, shapes.n_samples) and wave.dtype == jnp.float32
  sc = gl.spectral_convergence(mag, np.asarray(wave), s.n_fft, s.hop)
  assert np.all(sc < 0.5)


def test_spectral_convergence():
  x = notes(1, 8000, 4096)
  mag = sp.magnitude(x, 256, 64)
  assert float(gl.spectral_convergence(mag, x, 256, 64)[0]) < 1e-5
  assert float(gl.spectral_convergence(mag, -x, 256, 64)[0]) < 1e-5  # phase-blind
  assert float(gl.spectral_convergence(mag, 0 * x, 256, 64)[0]) == pytest.approx(1.0)
  sc_j = gl.spectral_convergence(jnp.asarray(mag), jnp.asarray(0.5 * x), 256, 64)
  assert float(sc_j[0]) == pytest.approx(0.5, abs=1e-4)
