"""Where notes come from: NSynth as distributed, a folder of labelled audio, synthetic notes,
or a General MIDI SoundFont (mars_jax/data/soundfont.py).

Every source lists its examples per split without decoding audio (cheap, done once in
the parent of `prepare`), so shards can be planned and handed to worker processes.
An `Example` (mars_jax/data/examples.py, with the `Source` base class) carries everything a
worker needs, and is picklable: `load` is a file path or a picklable callable returning
(wave, sample_rate). Files a source has to drop while listing (e.g. no labels) are reported
by `skipped(split)` with a reason, never silently.
"""
from __future__ import annotations

import csv
import functools
import json
import os

from mars_jax import fs
from mars_jax.config import ConfigError
from mars_jax.data import soundfont, synthetic
from mars_jax.data.examples import SPLITS, Example, Source, hash_fraction

AUDIO_EXTS = ('.wav', '.flac', '.ogg', '.aiff', '.aif', '.mp3', '.au')
NSYNTH_SOURCES = ('acoustic', 'electronic', 'synthetic')   # instrument_source 0, 1, 2
NSYNTH_LAYOUT = ('NSynth layout: data.path/nsynth-train/, nsynth-valid/, nsynth-test/, each '
                 'holding examples.json and audio/<note_str>.wav (as extracted from the official '
                 'nsynth-{train,valid,test}.jsonwav.tar.gz archives).')


def hash_split(name: str, valid_fraction: float, test_fraction: float) -> str:
  u = hash_fraction('split/' + name)
  if u < valid_fraction:
    return 'valid'
  if u < valid_fraction + test_fraction:
    return 'test'
  return 'train'


def _keep(config, pitch, velocity=None):
  lo, hi = (int(v) for v in config.data.pitch_range)
  if not lo <= pitch <= hi:
    return False
  vels = tuple(int(v) for v in config.data.velocities)
  return not (vels and velocity is not None and int(velocity) not in vels)


class NSynthSource(Source):
  """NSynth as distributed: data.path/nsynth-{split}/examples.json + audio/<note>.wav."""

  name = 'nsynth'

  def __init__(self, config):
    super().__init__(config)
    self.root = _require_dir(config, 'nsynth')
    for split in SPLITS:
      d = fs.join(self.root, f'nsynth-{split}')
      if not fs.path(d).is_dir():
        raise ConfigError(f'data.path={self.root!r}: missing folder {d!r}. {NSYNTH_LAYOUT}')
      if not fs.exists(fs.join(d, 'examples.json')):
        raise ConfigError(f'data.path={self.root!r}: missing {fs.join(d, "examples.json")!r}.'
                          f' {NSYNTH_LAYOUT}')
    bad = set(config.data.instrument_sources) - set(NSYNTH_SOURCES)
    if bad:
      raise ConfigError(f'data.instrument_sources has {sorted(bad)}; use a subset of '
                        f'{NSYNTH_SOURCES}.')
    bad = set(config.data.instrument_families) - set(synthetic.NSYNTH_FAMILIES)
    if bad:
      raise ConfigError(f'data.instrument_families has {sorted(bad)}; use a subset of '
                        f'{synthetic.NSYNTH_FAMILIES}.')

  def _list(self, split):
    d = fs.join(self.root, f'nsynth-{split}')
    path = fs.join(d, 'examples.json')
    try:
      meta = json.loads(fs.read_text(path))
    except (OSError, ValueError) as e:
      raise ConfigError(f'data.path={self.root!r}: cannot read {path!r} ({e}). '
                        f'{NSYNTH_LAYOUT}') from e
    sources = set(self.config.data.instrument_sources)
    families = set(self.config.data.instrument_families)
    out, skipped, filtered = [], [], 0
    for note, m in meta.items():
      try:
        pitch, velocity = int(m['pitch']), int(m['velocity'])
        family, instrument = str(m['instrument_family_str']), str(m['instrument_str'])
        src = m.get('instrument_source_str')
        if src is None:
          src = NSYNTH_SOURCES[int(m['instrument_source'])]
      except (KeyError, TypeError, ValueError, IndexError) as e:
        skipped.append({'file': f'audio/{note}.wav', 'split': split,
                        'reason': f'missing labels: {type(e).__name__} {e}'})
        continue
      if ((sources and src not in sources) or (families and family not in families)
          or not _keep(self.config, pitch, velocity)):
        filtered += 1
        continue
      name = str(m.get('note_str', note))
      out.append(Example(name=name, split=split,
                         labels={'pitch': pitch, 'velocity': velocity, 'family': family,
                                 'instrument': instrument},
                         load=fs.join(d, 'audio', f'{name}.wav'),
                         key=f'nsynth-{split}/audio/{name}.wav'))   # relative: moves keep shards
    return out, skipped, filtered


class FolderSource(Source):
  """Audio files under data.path labelled by a CSV: file,pitch,instrument[,family,velocity,split].

  `file` is relative to data.path. A missing `family` is the instrument name, a missing
  `velocity` is 100, a missing `split` is a stable hash of the file name (fractions as
  data.synthetic.valid_fraction / test_fraction). Audio files without a usable CSV row are
  skipped with reason 'missing labels: ...'.
  """

  name = 'folder'

  def __init__(self, config):
    super().__init__(config)
    self.root = _require_dir(config, 'folder')
    self.csv = config.data.labels_csv or os.path.join(self.root, 'labels.csv')
    if not os.path.isfile(self.csv):
      raise ConfigError(f'data.labels_csv={config.data.labels_csv!r}: no labels file {self.csv!r}.'
                        f' Write a CSV with columns file,pitch,instrument[,family,velocity,split] '
                        f'(file relative to data.path), or point data.labels_csv at it.')
    self._rows = None

  def _read(self):
    if self._rows is not None:
      return self._rows
    vf = float(self.config.data.synthetic.valid_fraction)
    tf = float(self.config.data.synthetic.test_fraction)
    with open(self.csv, newline='') as f:
      reader = csv.DictReader(f)
      cols = [c.strip() for c in (reader.fieldnames or [])]
      missing = {'file', 'pitch', 'instrument'} - set(cols)
      if missing:
        raise ConfigError(f'data.labels_csv: {self.csv!r} lacks columns {sorted(missing)}; its '
                          f'header must include file,pitch,instrument[,family,velocity,split].')
      rows = [{(k or '').strip(): (v or '').strip() for k, v in r.items()} for r in reader]
    listed, per_split = set(), {s: ([], [], [0]) for s in SPLITS}
    for r in rows:
      rel = os.path.normpath(r['file'])
      listed.add(rel)
      split = r.get('split') or hash_split(rel, vf, tf)
      if split not in SPLITS:
        split_h = hash_split(rel, vf, tf)
        per_split[split_h][1].append({'file': rel, 'split': split_h,
                                      'reason': f'missing labels: split {split!r} not in {SPLITS}'})
        continue
      ex, skipped, filtered = per_split[split]
      absent = [k for k in ('pitch', 'instrument') if not r.get(k)]
      if absent:
        skipped.append({'file': rel, 'split': split,
                        'reason': f'missing labels: {",".join(absent)}'})
        continue
      try:
        pitch = int(float(r['pitch']))
        velocity = int(float(r['velocity'])) if r.get('velocity') else 100
      except ValueError:
        skipped.append({'file': rel, 'split': split,
                        'reason': f'missing labels: bad pitch/velocity {r["pitch"]!r}/'
                                  f'{r.get("velocity")!r}'})
        continue
      if not _keep(self.config, pitch, velocity):
        filtered[0] += 1
        continue
      ex.append(Example(name=rel, split=split,
                        labels={'pitch': pitch, 'velocity': velocity,
                                'family': r.get('family') or r['instrument'],
                                'instrument': r['instrument']},
                        load=os.path.join(self.root, rel), key=rel))
    # Audio present on disk but absent from the CSV: report, do not guess labels.
    csv_abs = os.path.abspath(self.csv)
    for dirpath, _, files in os.walk(self.root):
      for fn in sorted(files):
        full = os.path.join(dirpath, fn)
        rel = os.path.normpath(os.path.relpath(full, self.root))
        if (fn.lower().endswith(AUDIO_EXTS) and rel not in listed
            and os.path.abspath(full) != csv_abs):
          split = hash_split(rel, vf, tf)
          reason = f'missing labels: not in {os.path.basename(self.csv)}'
          per_split[split][1].append({'file': rel, 'split': split, 'reason': reason})
    self._rows = {s: (e, sorted(k, key=lambda d: d['file']), n[0])
                  for s, (e, k, n) in per_split.items()}
    return self._rows

  def _list(self, split):
    return self._read()[split]


class SyntheticSource(Source):
  """pitch_range x families x per_pitch_family train notes; valid/test in proportion.

  Each note has a deterministic velocity and instrument, drawn from (seed, split, index),
  and is rendered on demand in the worker (nothing is written to disk).
  """

  name = 'synthetic'

  def __init__(self, config):
    super().__init__(config)
    s = config.data.synthetic
    bad = [f for f in s.families if f not in synthetic.RECIPES]
    if bad:
      raise ConfigError(f'data.synthetic.families has {bad}; choose from '
                        f'{sorted(synthetic.RECIPES)}.')
    if not s.families:
      raise ConfigError('data.synthetic.families is empty; e.g. ("brass", "flute").')
    if s.per_pitch_family < 1:
      raise ConfigError(f'data.synthetic.per_pitch_family={s.per_pitch_family} must be >= 1.')
    if not (0 <= s.valid_fraction and 0 <= s.test_fraction
            and s.valid_fraction + s.test_fraction < 1):
      raise ConfigError('data.synthetic.valid_fraction + test_fraction must be in [0, 1).')

  def counts(self):
    s = self.config.data.synthetic
    lo, hi = (int(v) for v in self.config.data.pitch_range)
    n_train = (hi - lo + 1) * len(s.families) * int(s.per_pitch_family)
    per = n_train / (1.0 - s.valid_fraction - s.test_fraction)
    return {'train': n_train, 'valid': int(round(per * s.valid_fraction)),
            'test': int(round(per * s.test_fraction))}

  def _list(self, split):
    import numpy as np
    cfg = self.config
    s = cfg.data.synthetic
    lo, hi = (int(v) for v in cfg.data.pitch_range)
    families = tuple(s.families)
    sr = int(cfg.spectrogram.sample_rate)
    n_samples = int(round(sr * cfg.spectrogram.duration))
    vels = tuple(int(v) for v in cfg.data.velocities) or synthetic.VELOCITIES
    split_id = SPLITS.index(split)
    grid = [(p, f) for p in range(lo, hi + 1) for f in families]
    n = self.counts()[split]
    if split == 'train':
      cells = [grid[j // int(s.per_pitch_family)] for j in range(n)]
    else:  # spread held-out notes evenly over the grid, in a seeded order
      order = np.random.default_rng([int(cfg.seed), 7919, split_id]).permutation(len(grid))
      cells = [grid[order[j % len(grid)]] for j in range(n)]
    out = []
    for j, (pitch, family) in enumerate(cells):
      r = synthetic.note_rng(cfg.seed, 100 + split_id, j)
      velocity = int(vels[r.integers(len(vels))])
      inst = int(r.integers(synthetic.INSTRUMENTS_PER_FAMILY))
      iname = synthetic.instrument_names(family)[inst]
      args = (int(cfg.seed), split_id, j, pitch, family, velocity, inst, sr, n_samples)
      out.append(Example(
          name=f'{split}-{j:06d}-{iname}-{pitch:03d}-{velocity:03d}', split=split,
          labels={'pitch': pitch, 'velocity': velocity, 'family': family, 'instrument': iname},
          load=functools.partial(synthetic.render, *args),
          key='synthetic' + json.dumps(args)))
    return out, [], 0


def _require_dir(config, kind):
  path = config.data.path
  if not path:
    raise ConfigError(f"data.path is empty but data.source={kind!r} needs it: "
                      + (NSYNTH_LAYOUT if kind == 'nsynth' else
                         'set it to the folder holding the audio files and labels.csv.')
                      + " Or use data.source='synthetic' (built in, no download).")
  if fs.is_remote(path):
    if kind != 'nsynth':
      raise ConfigError(f'data.path={path!r}: data.source={kind!r} reads a local folder; copy it '
                        f'to local disk or mount the bucket (gcsfuse) and point data.path there.')
    if not fs.path(path).is_dir():
      raise ConfigError(f'data.path={path!r}: nothing there. {NSYNTH_LAYOUT}')
    return path
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ConfigError(f'data.path={config.data.path!r}: no such folder ({path}). '
                      + (NSYNTH_LAYOUT if kind == 'nsynth' else
                         'Point it at the folder holding the audio files and labels.csv.'))
  return path


SOURCES = {'nsynth': NSynthSource, 'folder': FolderSource, 'synthetic': SyntheticSource,
           'soundfont': soundfont.SoundFontSource}


def get_source(config) -> Source:
  """The configured source; raises ConfigError naming the field when it cannot be used."""
  kind = config.data.source
  if kind not in SOURCES:
    raise ConfigError(f'data.source={kind!r}: use one of {tuple(SOURCES)}.')
  return SOURCES[kind](config)


def vocab(source: Source, config=None) -> dict:
  """Sorted label vocabularies over every split (records store indices into these)."""
  fams, insts = set(), set()
  for split in SPLITS:
    for e in source.examples(split):
      fams.add(e.labels['family'])
      insts.add(e.labels['instrument'])
  if isinstance(source, SyntheticSource):  # every configured family and instrument, always
    for f in source.config.data.synthetic.families:
      fams.add(f)
      insts.update(synthetic.instrument_names(f))
  if hasattr(source, 'vocab_labels'):   # soundfont: every selected program, always
    more_fams, more_insts = source.vocab_labels()
    fams.update(more_fams)
    insts.update(more_insts)
  cfg = config or source.config
  return {'family': sorted(fams), 'instrument': sorted(insts),
          'pitch_range': [int(v) for v in cfg.data.pitch_range]}
