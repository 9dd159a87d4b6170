"""Cost of each evaluation metric at 1 000 and 10 000 generated notes.

  python -m mars_jax.bench evaluate [--sizes=1000,10000] [--ndb-dim=4096] [--pyin-notes=4]

Synthetic inputs shaped like the stage's (classifier probs over 88 pitches / 11 families,
128-d embeddings, pooled NDB_SIDE^2 spectrogram features, a fixed real bank of 10 000 as
evaluate.max_real gives). pyin runs on a few NSynth-sized notes (16 kHz, 4 s) and is
extrapolated per note. The point: every metric grows at most linearly in the number of
generated notes (KID is constant: fixed-size subsets), except NDB, whose k-means on the real
set is O(N k D iters) and whose iteration count depends on the data.
"""
from __future__ import annotations

from mars_jax.bench import machine
import datetime
import platform
import time

import numpy as np

from mars_jax.evaluate import metrics as M


def _machine():
  return (f'{machine.describe(with_jax=False)}, Python {platform.python_version()}, '
          f'numpy {np.__version__}')


def _time(fn, *args, **kw):
  t = time.perf_counter()
  fn(*args, **kw)
  return time.perf_counter() - t


def _probs(rng, n, c):
  return rng.dirichlet(np.full(c, 0.3), size=n)


def _pyin_per_note(notes, sr=16000, seconds=4.0):
  rng = np.random.default_rng(0)
  t = np.arange(int(sr * seconds)) / sr
  midi = rng.integers(36, 84, notes)
  waves = np.stack([np.sin(2 * np.pi * 440 * 2 ** ((m - 69) / 12) * t) * np.exp(-t)
                    for m in midi]).astype(np.float32)
  M.pitch_accuracy(waves[:1], sr, midi[:1])  # librosa import + numba compile out of the timing
  return _time(M.pitch_accuracy, waves, sr, midi) / notes


def main(argv):
  opts = dict(a.lstrip('-').split('=', 1) for a in argv if '=' in a)
  sizes = [int(s) for s in opts.get('sizes', '1000,10000').split(',')]
  ndb_dim = int(opts.get('ndb-dim', 4096))
  pyin_notes = int(opts.get('pyin-notes', 4))
  bank = int(opts.get('bank', 10000))
  rng = np.random.default_rng(0)
  emb_real = rng.standard_normal((bank, 128))
  feat_real = rng.standard_normal((bank, ndb_dim)).astype(np.float32)
  # Warm-up: imports and first-call costs (scipy's sqrtm, BLAS threads) stay out of the timings.
  small = rng.standard_normal((64, 128))
  M.inception_score(_probs(rng, 64, 88))
  M.kid(small, small + 0.1)
  M.frechet_distance(small, small + 0.1)
  M.ndb(feat_real[:200], feat_real[200:400], k=10)
  M.nearest_neighbours(feat_real[:64], feat_real[:256])
  rows = {}
  for n in sizes:
    probs = _probs(rng, n, 88)
    emb = rng.standard_normal((n, 128)) + 0.1
    feat = rng.standard_normal((n, ndb_dim)).astype(np.float32)
    r = rows.setdefault
    r('inception score (PIS/IIS)', {})[n] = _time(M.inception_score, probs)
    r('KID (PKID/IKID), 100 subsets of <= 1000', {})[n] = _time(M.kid, emb, emb_real)
    r('Frechet distance (fad_clf_*), D=128', {})[n] = _time(M.frechet_distance, emb, emb_real)
    # NDB: k-means runs on the real set; here the real set grows with N as the worst case
    # (in the stage it is capped by evaluate.max_real).
    r(f'NDB/k (k=50, D={ndb_dim}; k-means on N real)', {})[n] = _time(
        M.ndb, feat_real[:n] if n <= bank else np.resize(feat_real, (n, ndb_dim)), feat, k=50)
    r(f'nearest train note (memorisation), bank {bank}, D={ndb_dim}', {})[n] = _time(
        M.nearest_neighbours, feat, feat_real)
  per_note = _pyin_per_note(pyin_notes)
  rows[f'pyin pitch accuracy, 16 kHz 4 s notes (from {pyin_notes} notes, per-note x N)'] = {
      n: per_note * n for n in sizes}

  out = [f'Evaluation metric cost, {datetime.date.today().isoformat()}, {_machine()}', '',
         '| metric | ' + ' | '.join(f'N={n:,} (s)' for n in sizes) + ' | growth |',
         '|---|' + '---|' * len(sizes) + '---|']
  for name, t in rows.items():
    ratio = t[sizes[-1]] / max(t[sizes[0]], 1e-9)
    out.append(f'| {name} | ' + ' | '.join(f'{t[n]:.3f}' for n in sizes)
               + f' | x{ratio:.1f} for x{sizes[-1] / sizes[0]:.0f} notes |')
  print('\n'.join(out))
  return 0
