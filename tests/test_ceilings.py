"""Where quality is lost: the estimators each ceiling shares, on notes whose answer is known."""
import jax
import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import spectrogram as spec_lib
from mars_jax.data import synthetic
from mars_jax.evaluate import ceilings
from mars_jax.evaluate import metrics as M

from tests.helpers import load_config

PITCHES = (50, 55, 60, 64, 67, 71)   # inside the tiny config's range


def test_standard_error_known_values():
  assert M.standard_error(0.5, 100) == pytest.approx(0.05)
  assert M.standard_error(0.0, 96) == 0.0 and M.standard_error(1.0, 96) == 0.0
  assert M.standard_error(0.9, 400) == pytest.approx(0.015)
  assert np.isnan(M.standard_error(0.5, 0)) and np.isnan(M.standard_error(float('nan'), 10))


def test_ndb_with_fitted_bins_equals_refitting():
  rng = np.random.default_rng(0)
  ref, smp = rng.normal(size=(300, 6)), rng.normal(0.3, 1.0, size=(120, 6))
  bins = M.ndb_bins(ref, 8, seed=3)
  a, b = M.ndb(ref, smp, k=8, seed=3), M.ndb(ref, smp, bins=bins)
  assert a['ndb'] == b['ndb'] and a['js'] == b['js']
  np.testing.assert_array_equal(a['sample_props'], b['sample_props'])


@pytest.fixture(scope='module')
def notes():
  """Clean synthetic notes of known pitch on the tiny config: (config, shapes, waves, midi)."""
  config = load_config('tiny')
  shapes = config_lib.derive(config)
  sr = int(config.spectrogram.sample_rate)
  waves, midi = [], []
  for i, p in enumerate(PITCHES):
    family = ('brass', 'organ')[i % 2]
    waves.append(synthetic.synth_note(p, family, 100, sr, shapes.n_samples,
                                      np.random.default_rng(i)))
    midi.append(p)
  return config, shapes, np.stack(waves), np.array(midi)


def test_real_pitch_of_clean_notes_is_perfect_and_wrong_labels_are_caught(notes):
  config, _, waves, midi = notes
  sr = int(config.spectrogram.sample_rate)
  r = ceilings.pitch_scores(waves, sr, midi, 'real_')
  assert r == {'real_pitch_exact': 1.0, 'real_pitch_within_semitone': 1.0,
               'real_pitch_detected': 1.0}
  r = ceilings.pitch_scores(waves, sr, midi + np.array([0, 0, 2, 0, 0, 0]), 'real_')
  assert r['real_pitch_within_semitone'] == pytest.approx(5 / 6)


class _Identity:
  """A perfect tokenizer: what the Tokenizer's apply returns, with the input as output."""
  def apply(self, variables, x):
    return x, {}


class _Silence:
  """A tokenizer that loses everything: its decoded spectrogram is the silence floor."""
  def apply(self, variables, x):
    return -1.0 - 0.0 * x, {}


def test_perfect_tokenizer_round_trip_equals_griffin_lim(notes):
  config, shapes, waves, midi = notes
  sr = int(config.spectrogram.sample_rate)
  specs = spec_lib.spectrogram(waves, config.spectrogram)                 # (n, F, T)
  images = cmx_lib.to_image(specs, config.cmx)
  out = jax.device_get(jax.jit(ceilings.round_trip_fn(_Identity(), config, shapes))({}, images))
  assert out['recon_wave'].shape == (len(midi), shapes.n_samples)
  np.testing.assert_allclose(out['recon_wave'], out['gl_wave'], atol=1e-5)
  s = ceilings.score(out, specs, sr, midi)
  assert s['recon_mse'] == 0.0 and s['recon_mae'] == 0.0          # decoded == true
  assert s['recon_audio_mse'] == pytest.approx(s['gl_mse'], rel=1e-4, abs=1e-7)
  assert s['gl_mse'] > 0.0                     # Griffin-Lim's own loss is measured, not assumed
  for k in ('pitch_exact', 'pitch_within_semitone', 'pitch_detected'):
    assert s['recon_' + k] == s['gl_' + k], k
  assert s['gl_pitch_within_semitone'] == 1.0  # clean notes survive Griffin-Lim
  # A tokenizer that loses the note scores below Griffin-Lim on the same estimators.
  bad = jax.device_get(jax.jit(ceilings.round_trip_fn(_Silence(), config, shapes))({}, images))
  sb = ceilings.score(bad, specs, sr, midi)
  assert sb['recon_pitch_within_semitone'] == 0.0 and sb['recon_mse'] > 0.1
  assert sb['gl_pitch_within_semitone'] == s['gl_pitch_within_semitone']


def test_spread_covers_each_label_across_its_range():
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
  key = np.array([9, 1, 5, 3, 7, 2, 1, 5, 6, 4, 0])
  got = ceilings.spread(labels, per_label=2, max_labels=3, key=key)
  # Labels 0, 2 (or 1), 3 spread evenly; within each, the lowest and highest key.
  assert got == [1, 0, 9, 8, 10]
  assert ceilings.spread(labels, per_label=1, max_labels=10) == [0, 5, 7, 10]
