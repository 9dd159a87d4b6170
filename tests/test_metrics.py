"""Tests for mars_jax.evaluate.metrics: each checks a known value or a known trend."""
import librosa
import numpy as np
import pytest

from mars_jax.evaluate import metrics as M


# --- Inception score -------------------------------------------------------


@pytest.mark.parametrize('c', [2, 10, 55])
def test_is_one_hot_uniform_equals_num_classes(c):
  probs = np.eye(c)[np.arange(c * 7) % c]
  assert abs(M.inception_score(probs) - c) < 1e-6


def test_is_constant_prediction_is_one():
  row = np.random.default_rng(0).dirichlet(np.ones(12))
  assert abs(M.inception_score(np.tile(row, (50, 1))) - 1.0) < 1e-9


def test_is_between_one_and_c_for_soft_predictions():
  probs = np.random.default_rng(1).dirichlet(np.ones(8) * 0.3, size=400)
  s = M.inception_score(probs)
  assert 1.0 < s < 8.0


# --- KID / FD --------------------------------------------------------------


def _gauss(n, d, seed, shift=0.0):
  return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_kid_self_is_zero_and_grows_with_shift():
  x = _gauss(1000, 8, 0)
  # Against itself, points shared by the two subsets make MMD^2_u slightly
  # negative (~ -overlap/m^2); it is still far below any real shift.
  self_kid = M.kid(x, x, subsets=10, subset_size=300)
  shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
  vals = [M.kid(x, _gauss(1000, 8, 1, s), subsets=10, subset_size=300) for s in shifts]
  assert abs(self_kid) < 3e-3 and abs(self_kid) < 0.3 * vals[1], (self_kid, vals)
  assert abs(vals[0]) < 2e-3  # fresh draw of the same distribution
  assert all(b > a for a, b in zip(vals, vals[1:])), vals
  assert vals[-1] > 50 * max(abs(vals[0]), 1e-4)


def test_kid_deterministic_given_seed_and_symmetricish():
  x, y = _gauss(300, 4, 0), _gauss(300, 4, 1, 0.5)
  assert (M.kid(x, y, subsets=5, subset_size=100, seed=3)
          == M.kid(x, y, subsets=5, subset_size=100, seed=3))
  assert (M.kid(x, y, subsets=5, subset_size=300)
          == pytest.approx(M.kid(y, x, subsets=5, subset_size=300), rel=1e-9))


def test_kid_kernel_value_matches_definition():
  # One subset holding everything: compare with a direct unbiased MMD^2_u.
  x, y = _gauss(6, 3, 0), _gauss(5, 3, 1, 1.0)
  c = 16.0
  k = lambda a, b: c / (c + ((a - b) ** 2).sum())
  m = 5
  rng = np.random.default_rng(7)  # same draws as kid(seed=7)
  xs = x[rng.choice(6, m, replace=False)]
  ys = y[rng.choice(5, m, replace=False)]
  kxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m)) / (m * m)
  assert (M.kid(x, y, c=c, subsets=1, subset_size=10, seed=7)
          == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10))


def test_fd_self_is_zero_and_grows_with_shift():
  x = _gauss(2000, 8, 0)
  assert abs(M.frechet_distance(x, x)) < 1e-6
  vals = [M.frechet_distance(x, _gauss(2000, 8, 1, s)) for s in [0.0, 0.25, 0.5, 1.0, 2.0]]
  assert all(b > a for a, b in zip(vals, vals[1:])), vals
  assert vals[-1] == pytest.approx(8 * 4.0, rel=0.1)  # ||shift||^2 dominates


def _diag_closed_form(mu1, v1, mu2, v2):
  return float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum())


def test_fd_from_stats_exact_for_diagonal_gaussians():
  mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
  v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 1.0, 0.5])
  got = M.frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(_diag_closed_form(mu1, v1, mu2, v2), abs=1e-10)


def test_fd_from_stats_rotation_invariant():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  v1, v2 = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  got = M.frechet_distance_from_stats(q @ mu1, q @ np.diag(v1) @ q.T,
                                      q @ mu2, q @ np.diag(v2) @ q.T)
  assert got == pytest.approx(_diag_closed_form(mu1, v1, mu2, v2), rel=1e-8)


def test_fd_samples_match_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 0.0, -1.0, 1.0])
  v1, v2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.5, 2.0, 2.0, 1.0])
  x = mu1 + np.sqrt(v1) * rng.normal(size=(100_000, 4))
  y = mu2 + np.sqrt(v2) * rng.normal(size=(100_000, 4))
  want = _diag_closed_form(mu1, v1, mu2, v2)
  assert M.frechet_distance(x, y) == pytest.approx(want, rel=0.03, abs=0.02)


def test_fd_singular_covariance_is_finite():
  x, y = _gauss(5, 16, 0), _gauss(5, 16, 1, 1.0)  # rank-4 covariances in 16-D
  d = M.frechet_distance(x, y)
  assert np.isfinite(d) and d > 0


# --- NDB -------------------------------------------------------------------


def _mixture(n, seed):
  rng = np.random.default_rng(seed)
  centres = np.array([[0, 0, 0], [4, 0, 1], [0, 5, -1], [-3, -3, 2]], float)
  comp = rng.integers(len(centres), size=n)
  return centres[comp] + rng.normal(size=(n, 3))


def test_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([[0, 0], [20, 0], [0, 20]], float)
  x = np.concatenate([c + rng.normal(size=(200, 2)) for c in centres])
  cent, lab = M.kmeans(x, 3, seed=1)
  got = cent[np.argsort(cent[:, 0] + 2 * cent[:, 1])]
  np.testing.assert_allclose(got, centres, atol=0.3)
  assert len(set(lab[:200])) == 1 and len(set(lab)) == 3


def test_ndb_bins_are_deterministic_for_a_seed_and_k_is_checked():
  """scikit-learn's KMeans with a fixed random_state: the same bins, so the same NDB, every run."""
  ref, smp = _mixture(600, 0), _mixture(300, 1)
  a, b = M.ndb(ref, smp, k=10, seed=4), M.ndb(ref, smp, k=10, seed=4)
  assert a['js'] == b['js'] and a['ndb'] == b['ndb']
  np.testing.assert_array_equal(a['ref_props'], b['ref_props'])
  assert a['ref_props'].min() > 0                    # every bin holds reference points
  with pytest.raises(ValueError, match='k <= N'):      # the evaluate stage reports NaN on this
    M.ndb(ref[:5], smp, k=10)


def test_ndb_fresh_samples_near_alpha():
  ref = _mixture(3000, 0)
  res = [M.ndb(ref, _mixture(3000, s), k=10, alpha=0.05, seed=0) for s in (1, 2, 3)]
  mean_ndb_k = np.mean([r['ndb_k'] for r in res])
  assert mean_ndb_k < 0.2, res
  assert all(r['js'] < 0.01 for r in res)


def test_ndb_collapsed_samples_high():
  ref = _mixture(3000, 0)
  collapsed = ref[17] + 0.01 * np.random.default_rng(5).normal(size=(3000, 3))
  r = M.ndb(ref, collapsed, k=10, alpha=0.05, seed=0)
  assert r['ndb_k'] > 0.5 and r['ndb'] == round(r['ndb_k'] * 10)
  assert r['js'] > 0.3
  assert r['sample_props'].max() == 1.0


def test_ndb_z_test_threshold():
  # Two tight clusters, so bins are known: ref 900/100. Pooled two-proportion
  # z for 0.10 vs 0.13 (n=1000 each) is 2.10 (p=0.036, different at 0.05);
  # 0.10 vs 0.12 is 1.42 (p=0.16, not different).
  rng = np.random.default_rng(0)
  pts = lambda a, b: np.concatenate([rng.normal(0, 0.1, (a, 2)), rng.normal(10, 0.1, (b, 2))])
  ref = pts(900, 100)
  r13 = M.ndb(ref, pts(870, 130), k=2, alpha=0.05)
  r12 = M.ndb(ref, pts(880, 120), k=2, alpha=0.05)
  assert r13['ndb'] == 2 and r13['ndb_k'] == 1.0
  assert r12['ndb'] == 0 and r12['ndb_k'] == 0.0
  assert M.ndb(ref, pts(870, 130), k=2, alpha=0.01)['ndb'] == 0
  p, q = np.array([0.9, 0.1]), np.array([0.87, 0.13])
  m = (p + q) / 2
  want_js = 0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum()
  assert r13['js'] == pytest.approx(want_js, rel=1e-9)


# --- Pitch accuracy --------------------------------------------------------


def _tones(sr, midis, dur=0.5):
  t = np.arange(int(dur * sr)) / sr
  f = librosa.midi_to_hz(np.asarray(midis))[:, None]
  sine = 0.5 * np.sin(2 * np.pi * f * t)
  harm = sum((h * f < sr / 2) * np.sin(2 * np.pi * h * f * t + h) / h for h in range(1, 8))
  harm = 0.3 * harm * np.exp(-2.0 * t)  # decaying harmonic note
  return np.concatenate([sine, harm]), np.concatenate([midis, midis])


@pytest.mark.parametrize('sr,midis', [(8000, [40, 55, 67, 81]), (16000, [36, 60, 74, 96])])
def test_pitch_accuracy_on_synthetic_tones(sr, midis):
  waves, labels = _tones(sr, np.array(midis))
  r = M.pitch_accuracy(waves, sr, labels)
  assert r['within_semitone'] == 1.0 and r['detected'] == 1.0
  assert r['exact'] == 1.0
  wrong = labels.copy()
  wrong[1] += 5  # a fourth off: must be scored wrong
  r = M.pitch_accuracy(waves, sr, wrong)
  assert r['within_semitone'] == pytest.approx(7 / 8)
  assert abs(r['midi'][1] - labels[1]) < 0.5


# --- Nearest neighbours / reconstruction ------------------------------------


def test_nearest_neighbours_finds_exact_copy():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(700, 32))
  query = rng.normal(size=(50, 32))
  query[13] = 3.0 * bank[456]  # a (scaled) copy: cosine distance 0
  idx, dist = M.nearest_neighbours(query, bank, chunk=64)
  assert idx[13] == 456 and dist[13] < 1e-9
  others = np.delete(dist, 13)
  assert others.min() > 0.2
  # Chunking must not change the answer.
  qn = query / np.linalg.norm(query, axis=1, keepdims=True)
  bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  np.testing.assert_array_equal(idx, (qn @ bn.T).argmax(1))
  np.testing.assert_allclose(dist, 1 - (qn @ bn.T).max(1), atol=1e-12)


def test_recon_errors_known_values():
  x = np.array([[0.0, 1.0], [2.0, -1.0]])
  y = np.array([[1.0, 1.0], [0.0, -1.0]])
  r = M.recon_errors(x, y)
  assert r['mse'] == pytest.approx((1 + 0 + 4 + 0) / 4)
  assert r['mae'] == pytest.approx((1 + 0 + 2 + 0) / 4)
  assert M.recon_errors(x, x) == {'mse': 0.0, 'mae': 0.0}
  with pytest.raises(ValueError):
    M.recon_errors(x, y[:1])
