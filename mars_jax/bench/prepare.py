"""Benchmark of the `prepare` stage: clips/s per core on NSynth-shaped notes (16 kHz, 4 s,
512 x 512), read back from int16 wavs in NSynth's layout so file decode is included.

  python -m mars_jax.bench prepare [--clips 384] [--workers 1,2] [--unique 24]
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np


def _corpus(root, clips, unique):
  """NSynth layout with `clips` train notes; `unique` synthesised waves reused under new names."""
  import soundfile as sf
  from mars_jax.data import synthetic
  fams = ('brass', 'flute', 'guitar', 'organ', 'reed', 'string')
  waves = [synthetic.synth_note(48 + i % 24, fams[i % len(fams)], 100, 16000, 64000,
                                np.random.default_rng(i)) for i in range(unique)]
  for split, n in (('train', clips), ('valid', 1), ('test', 1)):
    d = os.path.join(root, f'nsynth-{split}')
    os.makedirs(os.path.join(d, 'audio'))
    meta = {}
    for i in range(n):
      fam = fams[i % unique % len(fams)]
      note = f'{fam}_acoustic_{i:03d}-{48 + i % unique % 24:03d}-100'
      sf.write(os.path.join(d, 'audio', note + '.wav'), waves[i % unique], 16000,
               subtype='PCM_16')
      meta[note] = {'note_str': note, 'pitch': 48 + i % unique % 24, 'velocity': 100,
                    'instrument_str': note.split('-')[0], 'instrument_family_str': fam,
                    'instrument_source_str': 'acoustic', 'instrument_source': 0,
                    'sample_rate': 16000}
    with open(os.path.join(d, 'examples.json'), 'w') as f:
      json.dump(meta, f)


def _stages(root, n=16):
  """CPU ms per clip of decode, spectrogram and encode, in this process (CPU time, so a
  busy shared machine does not inflate it)."""
  from mars_jax import defaults
  from mars_jax.audio.spectrogram import spectrogram
  from mars_jax.data import audio_io, records
  cfg = defaults.get_config().spectrogram
  d = os.path.join(root, 'nsynth-train', 'audio')
  files = sorted(os.listdir(d))[:n]
  t = {'decode': 0.0, 'spectrogram': 0.0, 'encode': 0.0}
  recs = []
  for f in files:
    t0 = time.process_time()
    w, _ = audio_io.load_clip(os.path.join(d, f), 16000, 64000, -60.0)
    t1 = time.process_time()
    s = spectrogram(w, cfg).astype(np.float16)
    t2 = time.process_time()
    recs.append(records.encode(s, {'pitch': 60, 'velocity': 100, 'family': 0,
                                   'instrument': 0}, f))
    t3 = time.process_time()
    t['decode'] += t1 - t0
    t['spectrogram'] += t2 - t1
    t['encode'] += t3 - t2
  c0 = time.process_time()
  records.write_shard(os.path.join(root, 'stages.array_record'), recs)  # ArrayRecord + zstd
  t['write'] = time.process_time() - c0
  out = {k: v / len(files) * 1e3 for k, v in t.items()}
  # The FFT inside spectrogram(): numpy's float32 rfft against scipy.fft's, CPU ms per clip.
  import scipy.fft
  frames = np.random.default_rng(0).standard_normal((64000 // cfg.hop + 1,
                                                     cfg.n_fft)).astype(np.float32)
  for name, fn in (('rfft_numpy', np.fft.rfft), ('rfft_scipy', scipy.fft.rfft)):
    fn(frames, axis=-1)
    c0 = time.process_time()
    for _ in range(10):
      fn(frames, axis=-1)
    out[name] = (time.process_time() - c0) / 10 * 1e3
  return out


def main(argv=()):
  p = argparse.ArgumentParser(prog='python -m mars_jax.bench prepare')
  p.add_argument('--clips', type=int, default=384)
  p.add_argument('--workers', default='1,2')
  p.add_argument('--unique', type=int, default=24)
  p.add_argument('--shards', type=int, default=8)
  args = p.parse_args(list(argv))
  from mars_jax import defaults
  from mars_jax.stages import prepare
  tmp = tempfile.mkdtemp(prefix='bench_prepare_')
  try:
    t0 = time.perf_counter()
    _corpus(os.path.join(tmp, 'nsynth'), args.clips, args.unique)
    print(f'corpus: {args.clips} wavs (16 kHz, 4 s, int16) in {time.perf_counter() - t0:.1f} s')
    st = _stages(os.path.join(tmp, 'nsynth'))
    print('CPU per clip, 1 process: ' + ', '.join(f'{k} {v:.2f} ms' for k, v in st.items()))
    results = []
    for w in (int(x) for x in args.workers.split(',')):
      c = defaults.get_config()
      c.data.source = 'nsynth'
      c.data.path = os.path.join(tmp, 'nsynth')
      c.data.prepare_workers = w
      c.data.examples_per_shard = math.ceil(args.clips / args.shards)
      work = os.path.join(tmp, f'work{w}')
      t0 = time.perf_counter()
      m = prepare.run(c, work, log=lambda *a, **k: None)
      wall = time.perf_counter() - t0
      n = sum(v['count'] for v in m['splits'].values())
      busy = cpu = 0.0
      for fn in os.listdir(os.path.join(work, 'data')):
        if fn.endswith('.done.json'):
          with open(os.path.join(work, 'data', fn)) as f:
            done = json.load(f)
          busy += done['seconds']
          cpu += done['cpu_seconds']
      r = {'workers': w, 'clips': n, 'wall_s': round(wall, 2),
           'clips_per_s': round(n / wall, 1), 'clips_per_s_per_core': round(n / wall / w, 1),
           'clips_per_busy_core_s': round(n / busy, 1),
           'clips_per_cpu_s': round(n / cpu, 1), 'bytes': m['bytes']}
      results.append(r)
      print(f'workers={w}: {n} clips in {wall:.2f} s = {n / wall:.1f} clips/s '
            f'({n / wall / w:.1f} per core wall-clock incl. process start; '
            f'{n / busy:.1f} per worker-second; {n / cpu:.1f} per CPU-second)')
    print(json.dumps({'bench': 'prepare', 'per_clip_ms': st, 'results': results}))
    return 0
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  import sys
  main(sys.argv[1:])
