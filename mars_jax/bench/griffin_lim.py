"""Griffin-Lim speed: JAX (batched, jit) vs librosa (one note at a time), per 4 s 16 kHz note.

`python -m mars_jax.bench griffin_lim [--iters 32,100] [--batch 8] [--librosa-notes 2]`
Both start from zero phase with the same momentum on the same magnitudes, so the spectral
convergence columns show they do the same work; the JAX compile time is reported apart.
Wall seconds and process CPU seconds are both given: on a shared machine CPU time is the
steadier measure of work.
"""
from mars_jax.bench.machine import describe
import argparse
import platform
import time

import numpy as np

SR, SECONDS, N_FFT, HOP = 16000, 4.0, 1024, 125


def notes(n, seed=0):
  """(n, 64000) NSynth-like notes: decaying harmonics, an attack and a little noise."""
  rng = np.random.default_rng(seed)
  m = int(SR * SECONDS)
  t = np.arange(m) / SR
  out = []
  for _ in range(n):
    f0 = 440.0 * 2 ** ((rng.integers(36, 84) - 69) / 12)
    decay = rng.uniform(0.5, 3)
    y = sum(rng.uniform(0.2, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
            * np.exp(-decay * np.sqrt(k) * t) for k in range(1, 30) if f0 * k < SR / 2)
    y = y * np.minimum(1, t / 0.01) + 0.01 * rng.standard_normal(m) * np.exp(-4 * t)
    out.append(0.8 * y / np.abs(y).max())
  return np.stack(out).astype(np.float32)


def machine():
  return f'{platform.platform()}; {describe()}'


def main(argv):
  p = argparse.ArgumentParser(prog='python -m mars_jax.bench griffin_lim', description=__doc__)
  p.add_argument('--iters', default='32,100', help='comma-separated iteration counts')
  p.add_argument('--batch', type=int, default=8, help='notes per JAX call')
  p.add_argument('--librosa-notes', type=int, default=2, help='notes timed through librosa')
  p.add_argument('--momentum', type=float, default=0.99)
  args = p.parse_args(argv)
  iters = [int(v) for v in args.iters.split(',')]

  import jax.numpy as jnp
  from mars_jax.audio import librosa_loader
  librosa = librosa_loader.load()
  from mars_jax.audio import griffin_lim as gl
  from mars_jax.audio import spectrogram as sp

  n = int(SR * SECONDS)
  x = notes(args.batch)
  mag = sp.magnitude(x, N_FFT, HOP)                                 # (B, 512, 512)
  full = np.swapaxes(np.asarray(gl.restore(mag)), -1, -2) * (N_FFT / 4.0)  # librosa scale/layout
  mag_j = jnp.asarray(mag)

  t0 = time.perf_counter()  # one compile serves every iteration count (n_iter is traced)
  compiled = gl.griffin_lim.lower(mag_j, N_FFT, HOP, n, iters[0], args.momentum).compile()
  compile_s = time.perf_counter() - t0

  print(f'machine: {machine()}')
  print(f'JAX compile (batch {args.batch}): {compile_s:.2f} s\n')
  print('| iters | batch | JAX s/note | librosa s/note | speedup | JAX cpu-s/note | '
        'librosa cpu-s/note | SC JAX | SC librosa |')
  print('|---|---|---|---|---|---|---|---|---|')
  k = min(args.librosa_notes, args.batch)
  librosa.griffinlim(full[0], n_iter=1, hop_length=HOP, n_fft=N_FFT)  # lazy imports, numba
  for it in iters:
    compiled(mag_j, it, args.momentum).block_until_ready()          # warm
    t0, c0 = time.perf_counter(), time.process_time()
    wave = np.asarray(compiled(mag_j, it, args.momentum).block_until_ready())
    jax_s = (time.perf_counter() - t0) / args.batch
    jax_c = (time.process_time() - c0) / args.batch
    ref = []
    t0, c0 = time.perf_counter(), time.process_time()
    for f in full[:k]:
      ref.append(librosa.griffinlim(f, n_iter=it, hop_length=HOP, n_fft=N_FFT, window='hann',
                                    center=True, pad_mode='constant', momentum=args.momentum,
                                    init=None, length=n))
    lib_s = (time.perf_counter() - t0) / k
    lib_c = (time.process_time() - c0) / k
    sc_j = float(np.mean(gl.spectral_convergence(mag[:k], wave[:k], N_FFT, HOP)))
    sc_l = float(np.mean(gl.spectral_convergence(mag[:k], np.stack(ref).astype(np.float32),
                                                 N_FFT, HOP)))
    print(f'| {it} | {args.batch} | {jax_s:.3f} | {lib_s:.3f} | {lib_s / jax_s:.1f}x | '
          f'{jax_c:.3f} | {lib_c:.3f} | {sc_j:.4f} | {sc_l:.4f} |', flush=True)
  return 0
