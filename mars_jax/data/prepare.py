"""Prepared data: audio -> normalised log-magnitude spectrograms in ArrayRecord shards.

Output (a contract other stages read), in the data folder (DIR/data/):
  {split}-{i:05d}-of-{n:05d}.array_record   one record per note (mars_jax.data.records)
  {split}-{i:05d}-of-{n:05d}.done.json      per-shard sidecar: content hash, counts, skips
  manifest.json                             written last, atomically: the data are complete

Spectrograms are stored in (F, T) layout in data.storage_dtype; CMX is applied at load
time by the input pipeline, so one prepared set serves every cmx.factor / mode.
One task = one shard, so a killed run loses at most the shards in flight: a rerun keeps
every shard whose sidecar hash matches its planned content and redoes the rest. Output
bytes depend only on the config, not on the number of worker processes. The `prepare`
stage (mars_jax.stages.prepare) decides when to call `write`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
import types

import numpy as np

from mars_jax import fs
from mars_jax import progress
from mars_jax.data import records
from mars_jax.config import NOT_CONTENT, ConfigError, derive, fingerprint

FORMAT = 1
SHARD_RE = re.compile(r'^(train|valid|test)-\d{5}-of-\d{5}\.(array_record|done\.json)$')
NSYNTH_NOTES = 305_979   # train 289,205 + valid 12,678 + test 4,096
SECTIONS = ('seed', 'data', 'spectrogram')   # the config sections the data depend on


def config_hash(config) -> str:
  return fingerprint(config, *SECTIONS, exclude=NOT_CONTENT)


def is_prepared(config, d) -> bool:
  """True iff folder `d` holds a manifest of this config and every shard it names exists with
  the size its sidecar recorded (a truncated shard is redone by the next run)."""
  try:
    m = json.loads(fs.read_text(fs.join(d, records.MANIFEST)))
  except (OSError, ValueError):
    return False
  if m.get('format') != FORMAT or m.get('config_hash') != config_hash(config):
    return False
  return all(damaged_shard(d, s) is None
             for sp in m.get('splits', {}).values() for s in sp.get('shards', []))


def damaged_shard(d, name) -> str | None:
  """What is wrong with shard `name` in folder `d` (missing, or not the size its sidecar
  {stem}.done.json recorded), or None."""
  p = fs.path(fs.join(d, name))
  if not p.exists():
    return f'{p} is missing'
  stem = name[:-len('.array_record')] if name.endswith('.array_record') else name
  try:
    want = json.loads(fs.read_text(fs.join(d, stem + '.done.json'))).get('bytes')
  except (OSError, ValueError, AttributeError):
    return f'{p}: its sidecar {stem}.done.json is missing or unreadable'
  got = p.stat().length
  if want is not None and got != want:
    return f'{p} has {got} bytes, {want} when written (truncated or damaged)'
  return None


LABEL_MAX_CHARS = 200


def check_vocab(vocab) -> None:
  """Label names become samples.json entries, report cells and (slugged) file names: each must
  be a non-empty string of printable characters. Raises DataError naming every bad label."""
  from mars_jax.data import pipeline
  bad = []
  for kind in ('family', 'instrument'):
    for name in vocab.get(kind, []):
      if not isinstance(name, str):
        why = 'not a string'
      elif not name.strip():
        why = 'empty'
      elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        why = 'has control characters (tab, newline, ...)'
      elif len(name) > LABEL_MAX_CHARS:
        why = f'longer than {LABEL_MAX_CHARS} characters'
      else:
        continue
      bad.append(f'{kind} {name!r}: {why}')
  if bad:
    raise pipeline.DataError(f'label names the pipeline cannot use: {"; ".join(bad)}. Fix them in '
                             f'the source\'s labels (e.g. the folder source\'s CSV) and rerun.')


def _atomic_json(path, obj):
  fs.write_text(path, json.dumps(obj, indent=1, sort_keys=False) + '\n')


def _params(config, shapes):
  """Everything besides the example list that determines a shard's bytes."""
  s = config.spectrogram
  dtype = np.dtype(config.data.storage_dtype)
  if dtype.kind != 'f':
    raise ConfigError(f'data.storage_dtype={config.data.storage_dtype!r}: use a float dtype, '
                      f"e.g. 'float16' or 'float32'.")
  return {'sample_rate': int(s.sample_rate), 'n_samples': shapes.n_samples,
          'n_fft': int(s.n_fft), 'hop': int(s.hop), 'log_eps': float(s.log_eps),
          'log_max': float(s.log_max), 'dtype': dtype.name,
          'silence_db': float(config.data.silence_db)}


def _plan(source, vocab, params, per_shard):
  """[(split, i, n, file stem, [(name, labels, load)], hash)] in a fixed order."""
  from mars_jax.data.examples import SPLITS
  fam = {f: i for i, f in enumerate(vocab['family'])}
  ins = {x: i for i, x in enumerate(vocab['instrument'])}
  tasks = []
  for split in SPLITS:
    exs = source.examples(split)
    n = math.ceil(len(exs) / per_shard)
    for i in range(n):
      chunk = exs[i * per_shard:(i + 1) * per_shard]
      items = [(e.name, {'pitch': int(e.labels['pitch']), 'velocity': int(e.labels['velocity']),
                         'family': fam[e.labels['family']],
                         'instrument': ins[e.labels['instrument']]}, e.load) for e in chunk]
      h = hashlib.sha256(json.dumps(
          {'format': FORMAT, 'params': params,
           'items': [(name, lab, e.key or str(e.load)) for (name, lab, _), e in zip(items, chunk)]},
          sort_keys=True).encode()).hexdigest()
      tasks.append({'split': split, 'index': i, 'count': n,
                    'stem': f'{split}-{i:05d}-of-{n:05d}', 'items': items, 'hash': h})
  return tasks


def _shard_done(d, task):
  """The sidecar of a complete, matching shard, or None."""
  path = fs.path(d) / (task['stem'] + '.array_record')
  try:
    done = json.loads(fs.read_text(fs.join(d, task['stem'] + '.done.json')))
  except (OSError, ValueError):
    return None
  if done.get('hash') != task['hash'] or not path.exists():
    return None
  if path.stat().length != done.get('bytes'):
    return None
  return done


def prepare_shard(task, params, d):
  """Worker body: decodes, fixes and transforms one shard's clips, writes it, then its sidecar."""
  from mars_jax.audio.spectrogram import spectrogram
  from mars_jax.data import audio_io
  t0, c0 = time.perf_counter(), time.process_time()
  spec_cfg = types.SimpleNamespace(n_fft=params['n_fft'], hop=params['hop'],
                                   log_eps=params['log_eps'], log_max=params['log_max'])
  dtype = np.dtype(params['dtype'])
  fixed = collections.Counter()
  skipped, out = [], []
  for name, labels, load in task['items']:
    try:
      wave, fixes = audio_io.load_clip(load, params['sample_rate'], params['n_samples'],
                                       params['silence_db'])
    except audio_io.BadAudio as e:
      skipped.append({'file': name, 'split': task['split'], 'reason': str(e)})
      continue
    fixed.update(fixes)
    spec = spectrogram(wave, spec_cfg).astype(dtype)
    out.append(records.encode(spec, labels, name))
  name = task['stem'] + '.array_record'
  count, nbytes = records.write_shard(fs.join(d, name), out)
  done = {'hash': task['hash'], 'file': name, 'count': count,
          'bytes': nbytes, 'fixed': dict(sorted(fixed.items())),
          'skipped': skipped, 'clips': len(task['items']),
          'seconds': round(time.perf_counter() - t0, 3),
          'cpu_seconds': round(time.process_time() - c0, 3)}
  _atomic_json(fs.join(d, task['stem'] + '.done.json'), done)
  return done


def watch_parent(parent_pid, every_s=1.0):
  """Worker initializer: the worker exits within `every_s` once its parent is gone (killed -9
  or crashed), instead of waiting forever on a queue nobody feeds."""
  import threading

  def watch():
    while True:
      time.sleep(every_s)
      if os.getppid() != parent_pid:
        os._exit(1)

  threading.Thread(target=watch, name='mars_jax-watch-parent', daemon=True).start()


def _run_task(args):
  task, params, d = args
  return task['stem'], prepare_shard(task, params, d)


def _workers(config, n_tasks):
  w = int(config.data.prepare_workers) or os.cpu_count() or 1
  return max(1, min(w, n_tasks))


def write(config, d, log):
  """Prepares folder `d` for `config`, reusing matching shards; returns the manifest."""
  from mars_jax.data import sources
  shapes = derive(config)
  chash = config_hash(config)
  per_shard = int(config.data.examples_per_shard)
  if per_shard < 1:
    raise ConfigError(f'data.examples_per_shard={per_shard} must be >= 1, e.g. 2048.')
  t0 = time.perf_counter()
  source = sources.get_source(config)
  vocab = sources.vocab(source, config)
  check_vocab(vocab)
  params = _params(config, shapes)
  tasks = _plan(source, vocab, params, per_shard)
  data = fs.makedirs(d)
  # Invalidate first: from here until the new manifest lands, the data are incomplete.
  manifest = fs.path(fs.join(d, records.MANIFEST))
  if manifest.exists():
    manifest.unlink()
  planned = {t['stem'] + ext for t in tasks for ext in ('.array_record', '.done.json')}
  for f in data.iterdir():
    if (SHARD_RE.match(f.name) and f.name not in planned) or '.tmp-' in f.name:
      f.unlink()
  results, todo = {}, []
  for t in tasks:
    done = _shard_done(d, t)
    if done is not None:
      results[t['stem']] = done
    else:
      todo.append(t)
  n_clips = sum(len(t['items']) for t in todo)
  workers = _workers(config, len(todo))
  log(f'[prepare] source={config.data.source} -> {d}: {len(tasks)} shards '
      f'({len(tasks) - len(todo)} reused), {n_clips} clips to do on {workers} worker(s)')
  t_work = time.perf_counter()
  jobs = [(t, params, d) for t in todo]

  # prepare runs on process 0 only (mars_jax.main): no need to ask jax which process this is.
  bar = progress.Progress('prepare', len(tasks), 'shards', start=len(results), process_index=0)
  skipped = []

  def report(stem, done):
    results[stem] = done
    skipped.extend(done['skipped'])
    bar.update(len(results), skipped=len(skipped))

  if workers == 1:
    for job in jobs:
      report(*_run_task(job))
  elif jobs:
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=watch_parent,
                                                initargs=(os.getpid(),)) as pool:
      futures = [pool.submit(_run_task, job) for job in jobs]
      try:
        for fut in concurrent.futures.as_completed(futures):
          report(*fut.result())
      except BaseException:
        for f in futures:
          f.cancel()
        raise
  bar.close()
  work_s = time.perf_counter() - t_work

  manifest = _manifest(config, shapes, chash, vocab, source, tasks, results)
  _check_splits(manifest, d)
  _atomic_json(fs.join(d, records.MANIFEST), manifest)
  _summary(manifest, config, shapes, n_clips, work_s, time.perf_counter() - t0, workers, log)
  return manifest


def _manifest(config, shapes, chash, vocab, source, tasks, results):
  from mars_jax.data import audio_io, sources
  s = config.spectrogram
  dtype = np.dtype(config.data.storage_dtype).name
  lo = math.log(s.log_eps)
  splits, fixed, skipped = {}, collections.Counter(), []
  for split in sources.SPLITS:
    skipped.extend(source.skipped(split))
    mine = [results[t['stem']] for t in tasks if t['split'] == split]
    for r in mine:
      fixed.update(r['fixed'])
      skipped.extend(r['skipped'])
    splits[split] = {'count': sum(r['count'] for r in mine),
                     'shards': [r['file'] for r in mine],
                     'shard_counts': [r['count'] for r in mine],
                     'shard_bytes': [r['bytes'] for r in mine],
                     'bytes': sum(r['bytes'] for r in mine),
                     'listed': len(source.examples(split)),
                     'filtered': source.filtered(split)}
  kinds = collections.Counter(audio_io.reason_kind(x['reason']) for x in skipped)
  extra = {'source_info': source.info()} if hasattr(source, 'info') else {}
  return {
      'format': FORMAT,
      'config_hash': chash,
      'source': config.data.source,
      'spectrogram': {'shape': [shapes.freq_bins, shapes.frames], 'dtype': dtype,
                      'layout': 'FT', 'sample_rate': int(s.sample_rate),
                      'duration': float(s.duration), 'n_samples': shapes.n_samples,
                      'n_fft': int(s.n_fft), 'hop': int(s.hop), 'log_eps': float(s.log_eps),
                      'log_max': float(s.log_max)},
      'normalisation': {'log_lo': lo, 'log_hi': float(s.log_max)},
      'vocab': vocab,
      'splits': splits,
      'bytes': sum(v['bytes'] for v in splits.values()),
      'fixed': {k: int(fixed.get(k, 0)) for k in audio_io.FIXES},
      'skipped': skipped,
      'skipped_counts': dict(sorted(kinds.items())),
      **extra,   # what a source records about itself (soundfont: file, hash, programs by split)
  }


def _check_splits(m, d):
  """A split that ends up empty although its source listed notes (every file missing or
  skipped), or an empty train split, is an error naming the split: no manifest is written."""
  from mars_jax.data import pipeline
  for split, v in m['splits'].items():
    listed = int(v.get('listed', 0))
    if v['count'] == 0 and (listed > 0 or split == 'train'):
      mine = [x for x in m['skipped'] if x.get('split') == split]
      kinds = collections.Counter(x['reason'].split(':')[0] for x in mine)
      why = ', '.join(f'{k} {n}' for k, n in sorted(kinds.items())) or 'none listed'
      examples = '; '.join(f'{x["file"]}: {x["reason"]}' for x in mine[:3])
      raise pipeline.DataError(
          f'split {split!r} ends up empty: {listed} notes listed, 0 prepared (skipped: {why})'
          + (f', e.g. {examples}' if examples else '') + f'. Check data.path and the data '
          f'filters; {d} has no manifest, so nothing downstream runs on it.')


def nsynth_size_estimate(shapes, dtype) -> int:
  """Bytes of all 305,979 NSynth notes at this config's spectrogram shape and dtype."""
  return NSYNTH_NOTES * shapes.freq_bins * shapes.frames * np.dtype(dtype).itemsize


def _summary(m, config, shapes, n_clips, work_s, total_s, workers, log):
  counts = ', '.join(f'{k} {v["count"]}' for k, v in m['splits'].items())
  fixes = ', '.join(f'{k} {v}' for k, v in m['fixed'].items())
  skips = ', '.join(f'{k} {v}' for k, v in m['skipped_counts'].items()) or 'none'
  rate = n_clips / work_s if work_s > 0 and n_clips else 0.0
  est = nsynth_size_estimate(shapes, config.data.storage_dtype)
  log(f'[prepare] done in {total_s:.1f} s: {counts}; fixed: {fixes}; skipped: {skips}; '
      f'{m["bytes"] / 1e6:.1f} MB; {rate:.0f} clips/s on {workers} worker(s) '
      f'({rate / workers:.0f} per worker)')
  log(f'[prepare] full NSynth at {shapes.freq_bins}x{shapes.frames} '
      f'{np.dtype(config.data.storage_dtype).name}: {NSYNTH_NOTES} notes -> '
      f'{est / 1e9:.1f} GB ({est / 2**30:.1f} GiB)')
