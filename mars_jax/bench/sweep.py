"""Sampling settings sweep: which cfg x top_k x top_p makes the notes people ask for?

For a trained workdir (prepare .. evaluate run, so the evaluation classifiers exist), generates
the same `--num` requests (spread over the pitch x instrument grid like the sample stage, seeds
0..num-1) at every setting of the grid and scores them with the evaluate stage's estimators:
  pitch exact / within a semitone (librosa.pyin) with their standard errors,
  the classifiers' agreement with the requested pitch / instrument,
  PKID / IKID (kernel distance of classifier embeddings to the training notes) and NDB/k.
Settings whose pitch accuracy is within two standard errors of the best are marked: the data
cannot tell them apart.

Run:
  python -m mars_jax.bench sweep --workdir DIR [--cfg 0,1.5,3] [--top-k 0,64] [--top-p 0,0.9]
                                 [--num 96] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

from mars_jax.bench import machine as machine_lib


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _floats(text):
  return [float(v) for v in text.split(',') if v]


def grid(cfgs, top_ks, top_ps):
  """Every (cfg, top_k, top_p) setting, in a fixed order."""
  return [(float(c), int(k), float(p)) for c, k, p in itertools.product(cfgs, top_ks, top_ps)]


def within_two_errors(rows, key='pitch_within_semitone'):
  """Marks each row whose `key` is within two standard errors (of the difference) of the best."""
  best = max(rows, key=lambda r: r[key])
  for r in rows:
    se = np.hypot(r[key + '_se'], best[key + '_se'])
    r['near_best'] = bool(best[key] - r[key] <= 2 * se)
  return rows


def score(config, gen_specs, waves, pitch, instrument, feat, train, pitch_lo):
  """The evaluate stage's metrics of one setting's notes."""
  from mars_jax.evaluate import ceilings
  from mars_jax.evaluate import metrics as M
  from mars_jax.stages import evaluate as ev
  sr = int(config.spectrogram.sample_rate)
  x = feat(gen_specs)
  x.update(pitch=np.asarray(pitch), instrument=np.asarray(instrument))
  out = ev.set_metrics(config, x, train, '', pitch_lo)
  out.update(ceilings.pitch_scores(waves, sr, np.asarray(pitch), ''))
  n = len(waves)
  for k in ('pitch_exact', 'pitch_within_semitone', 'clf_pitch_match', 'clf_instrument_match'):
    out[k + '_se'] = M.standard_error(out[k], n)
  out['n'] = n
  return out


def run(workdir, settings, num, log=_log):
  from mars_jax import config as config_lib
  from mars_jax import workdir as workdir_lib
  from mars_jax.audio import spectrogram as spec_lib
  from mars_jax.evaluate import classifiers
  from mars_jax.sample import Generator
  from mars_jax.stages import evaluate as ev
  from mars_jax.stages import sample as sample_stage
  from mars_jax.train import partitioning

  gen = Generator.from_workdir(workdir)
  config = gen.config
  for target in classifiers.TARGETS:
    if not workdir_lib.is_complete(workdir_lib.classifier_dir(workdir, target),
                                   workdir_lib.classifier_fingerprint(config, target)):
      raise SystemExit(f'{workdir} has no trained {target} classifier: run '
                       f'`python -m mars_jax.main --workdir={workdir} --stages=evaluate` first.')
  shapes = config_lib.derive(config)
  mesh = partitioning.make_mesh(config)
  t0 = time.time()
  feat = ev.Featuriser(config, workdir, mesh)
  train = ev.real_features(feat, ev.RealSplit(config, workdir, 'train'))
  log(f'[sweep] training-note features in {time.time() - t0:.1f}s')
  config.sample.num = num
  reqs = sample_stage.requests(config, gen.pitches, gen.instruments)
  pitch = [p for p, _ in reqs]
  inst_names = [i for _, i in reqs]
  inst = [gen.instruments.index(i) for i in inst_names]
  rows = []
  for cfg, top_k, top_p in settings:
    t0 = time.time()
    specs = gen.spectrograms(pitch, inst_names, list(range(num)), cfg=cfg, top_k=top_k,
                             top_p=top_p)
    waves = gen.audio(specs)
    # Score the audio as the evaluate stage scores samples: re-analysed spectrograms.
    row = score(config, spec_lib.spectrogram(waves, config.spectrogram), waves, pitch, inst,
                feat, train, shapes.pitch_lo)
    row.update(cfg=cfg, top_k=top_k, top_p=top_p, seconds=time.time() - t0)
    rows.append(row)
    log(f'[sweep] cfg {cfg} top_k {top_k} top_p {top_p}: pitch within a semitone '
        f'{row["pitch_within_semitone"]:.3f} +- {row["pitch_within_semitone_se"]:.3f}, '
        f'pkid {row["pkid"]:.4f} ({row["seconds"]:.0f}s)')
  return within_two_errors(rows)


def table(rows) -> str:
  lines = ['| cfg | top_k | top_p | pitch within 1 (se) | pitch exact (se) | clf pitch | '
           'clf instrument | PKID | IKID | NDB/k | near best |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["cfg"]:g} | {r["top_k"]} | {r["top_p"]:g} | {r["pitch_within_semitone"]:.3f} '
        f'({r["pitch_within_semitone_se"]:.3f}) | {r["pitch_exact"]:.3f} '
        f'({r["pitch_exact_se"]:.3f}) | {r["clf_pitch_match"]:.3f} | '
        f'{r["clf_instrument_match"]:.3f} | {r["pkid"]:.4f} | {r["ikid"]:.4f} | '
        f'{r["ndb_k"]:.2f} | {"yes" if r["near_best"] else ""} |')
  return '\n'.join(lines)


def main(argv):
  p = argparse.ArgumentParser(prog='python -m mars_jax.bench sweep', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='a workdir the evaluate stage has run in')
  p.add_argument('--cfg', default='0,1.5,3', help='guidance weights')
  p.add_argument('--top-k', default='0,64', help='top-k values (0 = off)')
  p.add_argument('--top-p', default='0,0.9', help='top-p values (0 = off)')
  p.add_argument('--num', type=int, default=96, help='notes per setting (96: se ~5 points)')
  p.add_argument('--json', action='store_true', help='one JSON document instead of a table')
  args = p.parse_args(argv)
  settings = grid(_floats(args.cfg), [int(v) for v in _floats(args.top_k)], _floats(args.top_p))
  t0 = time.time()
  rows = run(args.workdir, settings, args.num)
  if args.json:
    print(json.dumps({'machine': machine_lib.describe(), 'workdir': args.workdir, 'rows': rows,
                      'seconds': time.time() - t0}, default=float))
    return 0
  print(f'machine: {machine_lib.describe()}; workdir {args.workdir}; {args.num} notes a setting; '
        f'{time.time() - t0:.0f} s')
  print(table(rows))
  return 0
