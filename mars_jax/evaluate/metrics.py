"""Evaluation metrics for generated notes (the keys of metrics.json: README.md, Evaluation).

Pure functions over numpy arrays. Costs are linear in the number of samples
except where stated: KID works on fixed-size random subsets (cost
subsets * subset_size^2, independent of N), NDB's k-means (scikit-learn) is
O(N * k * D * iters), and nearest_neighbours is O(N * M * D) by nature (every
query against every bank item), computed in bounded-memory chunks.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special
import scipy.stats

from mars_jax.audio import librosa_loader


def _as2d(a, name):
  a = np.asarray(a, dtype=np.float64)
  if a.ndim != 2:
    raise ValueError(f'{name} must be 2-D (N, D), got shape {a.shape}')
  return a


def _sq_dists(a, b):
  """Squared euclidean distances (len(a), len(b)), clipped at 0 against rounding."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


# --- Inception score -------------------------------------------------------


def inception_score(probs) -> float:
  """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction over the set.

  Rows are renormalised to sum to 1; 0 log 0 is taken as 0, so confident
  one-hot predictions spread evenly over C classes give exactly C and a
  constant prediction gives 1.
  """
  p = _as2d(probs, 'probs')
  if np.any(p < 0):
    raise ValueError('probs must be non-negative')
  p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
  py = p.mean(0, keepdims=True)
  kl = (scipy.special.xlogy(p, p) - scipy.special.xlogy(p, py)).sum(1)
  return float(np.exp(kl.mean()))


# --- Kernel inception distance ---------------------------------------------


def _imq_kernel(a, b, c):
  return c / (c + _sq_dists(a, b))


def kid(x, y, c: float = 16.0, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
  """KID: MMD^2 between x and y with the inverse multiquadratic kernel.

  k(a, b) = c / (c + ||a - b||^2), c = 16 (Nistal et al. 2020).
  Estimator: the unbiased MMD^2_u (diagonal terms of k(x,x) and k(y,y)
  dropped) on `subsets` random subsets of m = min(subset_size, N, M) points
  drawn without replacement from each set (seeded), averaged. Cost is
  O(subsets * m^2 * D), independent of N and M; can be slightly negative.
  """
  x, y = _as2d(x, 'x'), _as2d(y, 'y')
  if x.shape[1] != y.shape[1]:
    raise ValueError(f'feature dims differ: {x.shape} vs {y.shape}')
  m = int(min(subset_size, len(x), len(y)))
  if m < 2:
    raise ValueError('kid needs at least 2 points in each set')
  rng = np.random.default_rng(seed)
  vals = np.empty(subsets)
  for s in range(subsets):
    a = x[rng.choice(len(x), m, replace=False)]
    b = y[rng.choice(len(y), m, replace=False)]
    kxx, kyy, kxy = _imq_kernel(a, a, c), _imq_kernel(b, b, c), _imq_kernel(a, b, c)
    vals[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2.0 * kxy.mean())
  return float(vals.mean())


# --- Frechet distance ------------------------------------------------------


def frechet_distance_from_stats(mu1, s1, mu2, s2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, s1) and N(mu2, s2).

  d^2 = ||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^{1/2}). If the matrix square
  root is not finite (singular covariances), eps * I is added to both, as in
  the reference FID code; the real part of sqrtm is used.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f'shape mismatch: {mu1.shape} {s1.shape} {mu2.shape} {s2.shape}')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    off = eps * np.eye(s1.shape[0])
    covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
  covmean = np.real(covmean)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(x, y, eps: float = 1e-6) -> float:
  """Frechet distance between Gaussians fitted to rows of x and y (FAD/FID)."""
  x, y = _as2d(x, 'x'), _as2d(y, 'y')
  if len(x) < 2 or len(y) < 2:
    raise ValueError('frechet_distance needs at least 2 points per set')
  return frechet_distance_from_stats(x.mean(0), np.cov(x, rowvar=False),
                                     y.mean(0), np.cov(y, rowvar=False), eps=eps)


# --- NDB -------------------------------------------------------------------


def kmeans(x, k: int, seed: int = 0):
  """scikit-learn's k-means (k-means++ init, one seeded run); returns (centroids, labels), the
  labels those of the final centroids."""
  from sklearn.cluster import KMeans
  x = _as2d(x, 'x')
  if not 1 <= k <= len(x):
    raise ValueError(f'need 1 <= k <= N, got k={k}, N={len(x)}')
  fit = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
  return fit.cluster_centers_, fit.labels_


def _js_divergence(p, q):
  m = 0.5 * (p + q)
  return float(0.5 * scipy.stats.entropy(p, m) + 0.5 * scipy.stats.entropy(q, m))


def ndb_bins(reference, k: int = 50, seed: int = 0, whiten: bool = False) -> dict:
  """NDB's bins fitted once on the reference set, reusable for several sample sets
  (k-means is the expensive part: O(N * k * D * iters))."""
  ref = _as2d(reference, 'reference')
  mu, sd = np.zeros(ref.shape[1]), np.ones(ref.shape[1])
  if whiten:
    mu, sd = ref.mean(0), ref.std(0)
    sd = np.where(sd > 0, sd, 1.0)
  cent, ref_lab = kmeans((ref - mu) / sd, k, seed=seed)
  return {'centroids': cent, 'ref_labels': ref_lab, 'mu': mu, 'sd': sd, 'k': k}


def ndb(reference, samples, k: int = 50, alpha: float = 0.05, seed: int = 0,
        whiten: bool = False, bins: dict | None = None) -> dict:
  """Number of statistically Different Bins (Richardson & Weiss 2018).

  k-means (k bins) on the reference set; samples go to their nearest
  centroid; each bin's proportions are compared with a two-sided
  two-proportion z-test (pooled variance) at level alpha. Returns
  ndb (count of different bins), ndb_k (= ndb / k) and js, the
  Jensen-Shannon divergence (natural log, <= ln 2) between the two bin
  histograms. whiten=True standardises features by the reference mean/std. `bins`, from
  ndb_bins(reference, k, seed, whiten), skips refitting the k-means (k/seed/whiten then
  come from it).
  """
  from sklearn.metrics import pairwise_distances_argmin   # ~1 s to import: only when used
  ref, smp = _as2d(reference, 'reference'), _as2d(samples, 'samples')
  if ref.shape[1] != smp.shape[1]:
    raise ValueError(f'feature dims differ: {ref.shape} vs {smp.shape}')
  bins = bins or ndb_bins(ref, k, seed=seed, whiten=whiten)
  k, cent, ref_lab = bins['k'], bins['centroids'], bins['ref_labels']
  smp_lab = pairwise_distances_argmin((smp - bins['mu']) / bins['sd'], cent)   # nearest centroid
  n1, n2 = len(ref), len(smp)
  p1 = np.bincount(ref_lab, minlength=k) / n1
  p2 = np.bincount(smp_lab, minlength=k) / n2
  pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
  se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
  with np.errstate(divide='ignore', invalid='ignore'):
    z = np.where(se > 0, (p1 - p2) / se, 0.0)
  pval = 2.0 * scipy.stats.norm.sf(np.abs(z))
  different = (pval < alpha) & (se > 0)
  count = int(different.sum())
  return {'ndb': count, 'ndb_k': count / k, 'js': _js_divergence(p1, p2),
          'different_bins': different, 'ref_props': p1, 'sample_props': p2}


# --- Accuracies ------------------------------------------------------------


def standard_error(p, n) -> float:
  """Binomial standard error sqrt(p (1 - p) / n) of an accuracy p measured on n items: about
  5 points at p = 0.5, n = 100, so two accuracies closer than ~2 errors are not a result.
  NaN when n = 0 or p is undefined."""
  p, n = float(p), int(n)
  if n <= 0 or not np.isfinite(p):
    return float('nan')
  return float(np.sqrt(max(p * (1.0 - p), 0.0) / n))


# --- Pitch accuracy --------------------------------------------------------


def pitch_accuracy(waves, sr: int, target_midi, margin: float = 12.0,
                   resolution: float = 0.25, batch: int = 32) -> dict:
  """Pitch accuracy of notes measured with librosa.pyin (independent of the model).

  pyin runs with fmin/fmax spanning the targets' range widened by `margin`
  semitones (fmax capped below Nyquist), so a wrong pitch is still findable.
  A note's pitch is the median f0 over its voiced frames, rounded to the
  nearest MIDI number; undetected notes (no voiced frame) count as wrong.
  Returns exact (rounded == target), within_semitone (|rounded - target|
  <= 1), detected (fraction with any voiced frame), and midi (per-note
  float estimate, nan if undetected). Cost linear in N * T; pyin's Viterbi
  is quadratic in its pitch bins, so `resolution` (bins per semitone = 1 /
  resolution) stays coarse: 0.25 semitone is ample for nearest-MIDI scoring.
  """
  librosa = librosa_loader.load()
  w = np.asarray(waves, np.float32)
  if w.ndim == 1:
    w = w[None]
  tgt = np.asarray(target_midi, np.float64).reshape(-1)
  if w.ndim != 2 or len(w) != len(tgt):
    raise ValueError(f'waves must be (N, T) matching target_midi (N,), got {w.shape}, {tgt.shape}')
  fmax = min(float(librosa.midi_to_hz(tgt.max() + margin)), 0.95 * sr / 2)
  fmin = min(float(librosa.midi_to_hz(tgt.min() - margin)), fmax / 2)
  fmin = max(fmin, 20.0)
  # Two periods of fmin must fit a frame; keep ~64 ms frames otherwise.
  need = max(2.0 * sr / fmin + 2, 0.064 * sr)
  frame_length = int(2 ** np.ceil(np.log2(need)))
  midi = np.full(len(tgt), np.nan)
  for i in range(0, len(w), batch):
    f0, voiced, _ = librosa.pyin(w[i:i + batch], fmin=fmin, fmax=fmax, sr=sr,
                                 frame_length=frame_length, resolution=resolution)
    for j in range(len(f0)):
      v = voiced[j] & np.isfinite(f0[j])
      if v.any():
        midi[i + j] = float(librosa.hz_to_midi(np.median(f0[j][v])))
  detected = np.isfinite(midi)
  err = np.where(detected, np.abs(np.round(np.nan_to_num(midi)) - tgt), np.inf)
  return {'exact': float(np.mean(err == 0)), 'within_semitone': float(np.mean(err <= 1)),
          'detected': float(detected.mean()), 'midi': midi}


# --- Memorisation / reconstruction ------------------------------------------


def nearest_neighbours(query, bank, chunk: int = 1024):
  """Nearest bank row for each query row by cosine distance (1 - cos sim).

  Used as a memorisation check: a generated item at distance ~0 from a
  training item is a copy. Computed in (chunk x chunk) blocks so memory
  stays O(chunk^2) whatever N and M; time O(N * M * D).
  Returns (idx (N,) int64, dist (N,) float64).
  """
  q, b = _as2d(query, 'query'), _as2d(bank, 'bank')
  if q.shape[1] != b.shape[1]:
    raise ValueError(f'feature dims differ: {q.shape} vs {b.shape}')
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  best = np.full(len(q), -np.inf)
  idx = np.zeros(len(q), np.int64)
  for i in range(0, len(q), chunk):
    qi = q[i:i + chunk]
    for j in range(0, len(b), chunk):
      sim = qi @ b[j:j + chunk].T
      arg = sim.argmax(1)
      val = sim[np.arange(len(sim)), arg]
      better = val > best[i:i + chunk]
      best[i:i + chunk][better] = val[better]
      idx[i:i + chunk][better] = arg[better] + j
  return idx, np.maximum(1.0 - best, 0.0)


def recon_errors(x, y) -> dict:
  """Reconstruction errors between same-shaped arrays: mean squared / absolute error."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f'shapes differ: {x.shape} vs {y.shape}')
  d = x - y
  return {'mse': float(np.mean(d * d)), 'mae': float(np.mean(np.abs(d)))}
