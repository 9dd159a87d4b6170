"""`evaluate` stage: classifiers, the metrics listed in README.md (Evaluation), the report.

Inputs: DIR/data (prepared), DIR/tokenizer/checkpoints, DIR/samples/samples.json + wavs.
Outputs: DIR/eval/{pitch,instrument}_classifier/ (engine checkpoints + metrics.jsonl),
DIR/eval/metrics.json (flat: generated metric, its `real_` ceiling = held-out test notes
scored the same way against the training notes, sample counts) and DIR/report.html.

Where quality is lost: up to evaluate.ceiling_notes held-out test notes, evenly spread, go
through Griffin-Lim of their true spectrogram (`gl_*`) and through the tokenizer's round trip,
encode -> tokens -> decode -> Griffin-Lim (`recon_*`); their audio is scored with the estimators
the generated notes get (pyin pitch; the classifiers on the re-analysed spectrogram;
PKID/IKID/fad_clf/NDB against the training notes), and `real_pitch_*` scores the original audio
of the same notes. Every accuracy `k` carries `k_se`, its binomial standard error
sqrt(p(1-p)/n), and `k_n`, the notes it was measured on.

Feature spaces (stated, since several are our choice):
  * PIS/IIS: the classifiers' softmax; PKID/IKID and fad_clf_*: their embeddings (penultimate
    layer), KID with the unbiased MMD^2 estimator on random subsets (metrics.kid), kernel
    C/(C+d^2), C = evaluate.kid_c. `fad_clf_*` is a Frechet distance on OUR classifier's
    embeddings, not VGGish FAD: its values are not comparable with published FAD.
  * NDB/k and the memorisation check: the normalised spectrogram average-pooled to at most
    NDB_SIDE x NDB_SIDE (4096 dims at most, no PCA) -- k-means on full 512 x 512 spectrograms
    would cost 64x more for bins that the pooled view separates the same way. Memorisation
    uses cosine distance after subtracting the training mean (raw spectrograms are mostly
    the same silence floor, so uncentred cosines all sit near 0).
  * pitch_*: librosa.pyin on the waveforms (never seen by any model).
  * gl_mse/mae, recon_audio_mse/mae: the spectrogram re-analysed from the Griffin-Lim audio
    against the true one; recon_mse/mae: the decoded spectrogram against the true one (what
    the tokenizer alone loses), all on the normalised [-1, 1] scale.
Real sets: at most evaluate.max_real notes per split, a seeded random subset.
"""
from __future__ import annotations

import hashlib
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax import progress
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import spectrogram as spec_lib
from mars_jax.data import audio_io, pipeline, records
from mars_jax.evaluate import ceilings, classifiers, metrics as M, report
from mars_jax.train import partitioning

NAME = 'evaluate'
NDB_SIDE = 64          # pooled spectrogram side for NDB / memorisation features
CHUNK = 256            # records decoded and featurised at a time (bounded memory)
# Accuracies (fractions of notes): each gets `_se` and `_n` in metrics.json.
PITCH_ACC = ('pitch_exact', 'pitch_within_semitone', 'pitch_detected')
CLF_ACC = ('clf_pitch_match', 'clf_instrument_match')


def _samples_hash(workdir):
  """Content hash of samples.json and every wav it lists: new samples invalidate the result."""
  h = hashlib.sha256()
  path = fs.join(workdir_lib.samples_dir(workdir), workdir_lib.SAMPLES_JSON)
  try:
    blob = fs.read_bytes(path)
  except OSError:
    return 'none'
  h.update(blob)
  try:
    entries = json.loads(blob)
  except ValueError:
    return h.hexdigest()[:16]
  for e in entries if isinstance(entries, list) else []:
    try:
      h.update(fs.read_bytes(fs.join(workdir_lib.samples_dir(workdir), str(e.get('file')))))
    except (OSError, AttributeError):
      h.update(b'missing')
  return h.hexdigest()[:16]


def fingerprint(config, workdir):
  return f'{workdir_lib.fingerprint(config, NAME)}-{_samples_hash(workdir)}'


def is_complete(config, workdir):
  edir = workdir_lib.eval_dir(workdir)
  return (workdir_lib.is_complete(edir, fingerprint(config, workdir))
          and fs.exists(fs.join(edir, workdir_lib.METRICS_JSON))
          and fs.exists(fs.join(workdir, workdir_lib.REPORT)))


# --- inputs ------------------------------------------------------------------------------------


def load_samples(config, workdir, vocab):
  """samples.json -> (entries, requested pitch midi (N,), instrument index (N,))."""
  path = fs.join(workdir_lib.samples_dir(workdir), workdir_lib.SAMPLES_JSON)
  if not fs.exists(path):
    raise FileNotFoundError(f'no {path}: run the sample stage first '
                            f'(python -m mars_jax.main --stages=sample ...).')
  entries = json.loads(fs.read_text(path))
  names = list(vocab[config.data.instrument_label])
  pitch = np.zeros(len(entries), np.int64)
  inst = np.zeros(len(entries), np.int64)
  for i, e in enumerate(entries):
    pitch[i] = int(e['pitch'])
    if e['instrument'] not in names:
      raise ValueError(f'{path}: entry {i} has instrument {e["instrument"]!r}, not in the '
                       f'manifest vocab[{config.data.instrument_label!r}] {names}.')
    inst[i] = names.index(e['instrument'])
  return entries, pitch, inst


def load_waves(config, workdir, entries):
  """(waves (N, n_samples), bad): downmixed, resampled to the config's rate, padded/cropped to
  its length (prepare's rules); an unreadable or non-finite file becomes silence, counted in
  `bad`, so one broken sample does not hide the rest."""
  shapes = config_lib.derive(config)
  sr = int(config.spectrogram.sample_rate)
  waves = np.zeros((len(entries), shapes.n_samples), np.float32)
  bad = 0
  for i, e in enumerate(entries):
    try:
      waves[i], _ = audio_io.load_clip(fs.join(workdir_lib.samples_dir(workdir), e['file']), sr,
                                       shapes.n_samples, float('-inf'))   # local or gs://
    except audio_io.BadAudio:
      bad += 1
  return waves, bad


class RealSplit:
  """A seeded random subset (<= max_real) of one prepared split, read record by record."""

  def __init__(self, config, workdir, split):
    self.ds, self.shapes = pipeline.open_split(config, workdir_lib.data_dir(workdir), split)
    n = len(self.ds)
    cap = int(config.evaluate.max_real)
    idx = np.arange(n)
    if cap and n > cap:
      split_id = ('train', 'valid', 'test').index(split)
      rng = np.random.default_rng([int(config.seed), 0xE7A1, split_id])
      idx = np.sort(rng.choice(n, cap, replace=False))
    self.indices, self.split = idx, split
    self.label = str(config.data.instrument_label)

  def __len__(self):
    return len(self.indices)

  def record(self, j):
    """The j-th selected record: {'spec' (F, T) float32, 'name', labels...}."""
    r = records.decode(self.ds[int(self.indices[j])])
    return {**r, 'spec': np.asarray(r['spec'], np.float32)}

  def chunks(self, size=CHUNK):
    for i in range(0, len(self), size):
      rs = [self.record(j) for j in range(i, min(i + size, len(self)))]
      yield (np.stack([r['spec'] for r in rs]), np.array([int(r['pitch']) for r in rs]),
             np.array([int(r[self.label]) for r in rs]),
             [r['name'] for r in rs], rs)


def pool_features(specs, side=NDB_SIDE):
  """(N, F, T) -> (N, f*t) average-pooled by the smallest integer factors leaving <= side."""
  specs = np.asarray(specs, np.float32)
  n, F, T = specs.shape

  def factor(d):
    return next(k for k in range(1, d + 1) if d % k == 0 and d // k <= side)
  a, b = factor(F), factor(T)
  return specs.reshape(n, F // a, a, T // b, b).mean((2, 4)).reshape(n, -1)


# --- features ----------------------------------------------------------------------------------


class Featuriser:
  """Classifier probs/embeddings, pooled spectrogram features and tokenizer errors per chunk."""

  def __init__(self, config, workdir, mesh):
    self.config, self.mesh = config, mesh
    self.shapes = config_lib.derive(config)
    self.models = {t: trained.load_classifier(config, workdir, t, mesh)
                   for t in classifiers.TARGETS}
    self.tok = None
    self.workdir = workdir

  def image(self, specs):
    return cmx_lib.to_image(np.asarray(specs, np.float32), self.config.cmx)

  def __call__(self, specs, recon=False):
    images = self.image(specs)
    out = {'feat': pool_features(specs)}
    for t, (params, model) in self.models.items():
      out[f'probs_{t}'], out[f'emb_{t}'] = classifiers.probs_and_embeddings(
          model, params, images, self.mesh)
    if recon:
      params, model = self.tokenizer()

      def make():
        def err(p, x):
          r = model.apply({'params': p}, x)[0].astype(jnp.float32)
          d = r - x
          return jnp.mean(d * d, axis=(1, 2, 3)), jnp.mean(jnp.abs(d), axis=(1, 2, 3))
        return err
      key = ('tokenizer_err', self.config.to_json_best_effort(sort_keys=True))
      jitted = classifiers.cached_jit(key, make, self.mesh)
      out['sq_err'], out['abs_err'] = classifiers.batched_apply(jitted, params, images, self.mesh)
    return out

  def tokenizer(self):
    if self.tok is None:
      self.tok = trained.load_tokenizer(self.config, self.workdir, self.mesh)
    return self.tok

  def round_trip(self, specs):
    """(N, F, T) true spectrograms -> ceilings.round_trip_fn's outputs (numpy), one jit."""
    params, model = self.tokenizer()
    key = ('round_trip', self.config.to_json_best_effort(sort_keys=True))
    jitted = classifiers.cached_jit(
        key, lambda: ceilings.round_trip_fn(model, self.config, self.shapes), self.mesh)
    return classifiers.batched_apply(jitted, params, self.image(specs), self.mesh)


def _concat(parts):
  keys = parts[0].keys()
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def real_features(feat, split: RealSplit, recon=False):
  parts, pitch, inst, names = [], [], [], []
  for specs, p, i, n, _ in split.chunks():
    parts.append(feat(specs, recon=recon))
    pitch.append(p)
    inst.append(i)
    names += n
  out = _concat(parts)
  out.update(pitch=np.concatenate(pitch), instrument=np.concatenate(inst), names=names)
  return out


def source_audio(config, split: RealSplit, js):
  """Original waveforms of split records js (through the data source: synthetic notes are
  re-rendered, files re-read); Griffin-Lim of the stored spectrogram where that fails."""
  from mars_jax.audio import griffin_lim
  from mars_jax.data import sources
  shapes = config_lib.derive(config)
  sr = int(config.spectrogram.sample_rate)
  try:
    by_name = {e.name: e for e in sources.get_source(config).examples(split.split)}
  except Exception:  # data moved or unreadable listing: fall back below
    by_name = {}
  waves = np.zeros((len(js), shapes.n_samples), np.float32)
  fallback = []
  for k, j in enumerate(js):
    r = split.record(j)
    e = by_name.get(r['name'])
    try:
      if e is None:
        raise audio_io.BadAudio('not in source')
      waves[k], _ = audio_io.load_clip(e.load, sr, shapes.n_samples, float('-inf'))
    except Exception:
      fallback.append((k, r['spec']))
  if fallback:
    specs = np.stack([s for _, s in fallback])
    gl = np.asarray(griffin_lim.to_audio(jnp.asarray(specs), config.spectrogram))
    for (k, _), w in zip(fallback, gl):
      waves[k] = w[:shapes.n_samples]
  return waves


# --- metrics -----------------------------------------------------------------------------------


def _safe(fn, *args, **kw):
  """A metric that is undefined for these inputs (e.g. < 2 points) is NaN, not a crash."""
  try:
    return float(fn(*args, **kw))
  except ValueError:
    return float('nan')


def set_metrics(config, x, train, prefix, pitch_lo):
  """Every generator metric of set `x` (generated or held-out real) against `train`."""
  ev = config.evaluate
  c = float(ev.kid_c)
  out = {}
  out['pis'] = _safe(M.inception_score, x['probs_pitch'])
  out['iis'] = _safe(M.inception_score, x['probs_instrument'])
  out['pkid'] = _safe(M.kid, x['emb_pitch'], train['emb_pitch'], c=c)
  out['ikid'] = _safe(M.kid, x['emb_instrument'], train['emb_instrument'], c=c)
  out['fad_clf_pitch'] = _safe(M.frechet_distance, x['emb_pitch'], train['emb_pitch'])
  out['fad_clf_instrument'] = _safe(M.frechet_distance, x['emb_instrument'],
                                    train['emb_instrument'])
  k = min(int(ev.ndb_bins), len(train['feat']))
  try:
    if 'ndb_bins' not in train:   # k-means on the training notes once for every set scored
      train['ndb_bins'] = M.ndb_bins(train['feat'], k, seed=int(config.seed))
    r = M.ndb(train['feat'], x['feat'], alpha=float(ev.alpha), bins=train['ndb_bins'])
    out['ndb_k'], out['ndb_js'] = float(r['ndb_k']), float(r['js'])
  except ValueError:
    out['ndb_k'] = out['ndb_js'] = float('nan')
  out['clf_pitch_match'] = float(np.mean(x['probs_pitch'].argmax(1) == x['pitch'] - pitch_lo))
  out['clf_instrument_match'] = float(np.mean(x['probs_instrument'].argmax(1) == x['instrument']))
  return {prefix + k: v for k, v in out.items()}


def _weighted(parts):
  """Chunk means -> the mean over all notes (chunks weighted by their size)."""
  total = sum(n for n, _ in parts)
  return {k: float(sum(n * d[k] for n, d in parts) / total) for k in parts[0][1]}


def _nn(query, train_feat, mean):
  return M.nearest_neighbours(query - mean, train_feat - mean)


def ceiling_indices(config, n):
  """Up to evaluate.ceiling_notes of n held-out notes, evenly spread (records are stored in
  source order, so this covers the pitches and instruments rather than the first few)."""
  cap = int(config.evaluate.ceiling_notes)
  if cap < 1:
    raise ValueError(f'evaluate.ceiling_notes={cap}: it must be >= 1 (held-out notes taken '
                     f'through Griffin-Lim and the tokenizer; 96 gives ~5-point errors).')
  return np.unique(np.linspace(0, n - 1, min(n, cap)).round().astype(int)) if n else \
      np.zeros(0, int)


def compute_ceilings(config, feat, split, test, train, pitch_lo, log=progress.say):
  """Real -> Griffin-Lim -> tokenizer round trip on the same held-out notes, same estimators.

  Returns (metrics, n notes, triples): triples are a few notes per instrument for the report,
  each {'name', 'pitch', 'instrument', 'real'|'gl'|'recon': (spectrogram, wave)}.
  """
  t0 = time.time()
  sr = int(config.spectrogram.sample_rate)
  js = ceiling_indices(config, len(split))
  ev = config.evaluate
  show = set(ceilings.spread(test['instrument'][js], int(ev.report_triples),
                             max(1, int(ev.report_grid)), key=test['pitch'][js]))
  parts, gl_parts, recon_parts, triples = [], [], [], []
  bar = progress.Progress('evaluate', len(js), 'ceiling notes', every=CHUNK)
  for i in range(0, len(js), CHUNK):
    sel = js[i:i + CHUNK]
    specs = np.stack([split.record(j)['spec'] for j in sel])                 # (n, F, T)
    midi = test['pitch'][sel]
    real = source_audio(config, split, sel)                                  # (n, N)
    outs = feat.round_trip(specs)
    scores = ceilings.score(outs, specs, sr, midi)
    scores.update(ceilings.pitch_scores(real, sr, midi, 'real_'))
    parts.append((len(sel), scores))
    gl_parts.append(feat(outs['gl_spec']))
    recon_parts.append(feat(outs['recon_audio_spec']))
    for k, j in enumerate(sel):
      if i + k in show:
        triples.append({'name': test['names'][j], 'pitch': int(midi[k]),
                        'instrument': int(test['instrument'][j]),
                        'real': (specs[k], real[k]),
                        'gl': (outs['gl_spec'][k], outs['gl_wave'][k]),
                        'recon': (outs['recon_audio_spec'][k], outs['recon_wave'][k])})
    bar.update(i + len(sel))
  bar.close()
  out = _weighted(parts) if parts else {}
  labels = {'pitch': test['pitch'][js], 'instrument': test['instrument'][js]}
  for prefix, fparts in (('gl_', gl_parts), ('recon_', recon_parts)):
    if fparts:
      out.update(set_metrics(config, {**_concat(fparts), **labels}, train, prefix, pitch_lo))
  log(f'[evaluate] ceilings: {len(js)} held-out notes through Griffin-Lim and the tokenizer '
      f'({time.time() - t0:.1f}s)')
  return out, len(js), sorted(triples, key=lambda t: (t['instrument'], t['pitch']))


def add_standard_errors(out, counts):
  """k_se = sqrt(p(1-p)/n) and k_n = n for every accuracy k in `counts` {key: n}."""
  for k, n in counts.items():
    if k in out:
      out[f'{k}_se'] = M.standard_error(out[k], n)
      out[f'{k}_n'] = int(n)
  return out


def compute(config, workdir, mesh=None, log=progress.say):
  """All metrics plus what the report needs; trains nothing (classifiers must exist)."""
  shapes = config_lib.derive(config)
  mesh = mesh or partitioning.make_mesh(config)
  vocab = workdir_lib.load_manifest(workdir)['vocab']
  sr = int(config.spectrogram.sample_rate)
  t0 = time.time()
  feat = Featuriser(config, workdir, mesh)
  train_split = RealSplit(config, workdir, 'train')
  test_split = RealSplit(config, workdir, 'test')
  train = real_features(feat, train_split)
  test = real_features(feat, test_split, recon=True)
  log(f'[evaluate] real features: {len(train_split)} train, {len(test_split)} test notes '
      f'({time.time() - t0:.1f}s)')

  entries, gpitch, ginst = load_samples(config, workdir, vocab)
  if not entries:
    raise ValueError(f'{workdir}/samples/samples.json lists no samples; nothing to evaluate.')
  parts, pyin_parts, bad = [], [], 0
  for i in range(0, len(entries), CHUNK):  # streamed: 10 000 NSynth-sized notes fit in memory
    waves, b = load_waves(config, workdir, entries[i:i + CHUNK])
    bad += b
    parts.append(feat(spec_lib.spectrogram(waves, config.spectrogram)))
    pyin_parts.append((len(waves), ceilings.pitch_scores(waves, sr, gpitch[i:i + CHUNK], '')))
  gen = _concat(parts)
  gen.update(pitch=gpitch, instrument=ginst)

  out = {}
  out.update(set_metrics(config, gen, train, '', shapes.pitch_lo))
  out.update(set_metrics(config, test, train, 'real_', shapes.pitch_lo))
  out.update(_weighted(pyin_parts))
  ceiling, n_ceiling, triples = compute_ceilings(config, feat, test_split, test, train,
                                                 shapes.pitch_lo, log=log)
  out.update(ceiling)
  mean = train['feat'].mean(0)
  g_idx, g_dist = _nn(gen['feat'], train['feat'], mean)
  _, r_dist = _nn(test['feat'], train['feat'], mean)
  out['nn_dist_generated'] = float(g_dist.mean())
  out['nn_dist_real'] = float(r_dist.mean())
  out['mse'] = float(test['sq_err'].mean())
  out['mae'] = float(test['abs_err'].mean())
  out['acc_pitch_classifier'] = out['real_clf_pitch_match']
  out['acc_instrument_classifier'] = out['real_clf_instrument_match']
  out['num_generated'] = len(entries)
  out['num_generated_unreadable'] = bad
  out['num_real_train'] = len(train_split)
  out['num_real_test'] = len(test_split)
  out['num_real_pitch'] = n_ceiling
  out['num_ceiling'] = n_ceiling
  counts = {k: len(entries) for k in PITCH_ACC + CLF_ACC}
  counts.update({p + k: n_ceiling for p in ('gl_', 'recon_') for k in PITCH_ACC + CLF_ACC})
  counts.update({'real_' + k: n_ceiling for k in PITCH_ACC})
  counts.update({k: len(test_split) for k in ('real_clf_pitch_match', 'real_clf_instrument_match',
                                              'acc_pitch_classifier',
                                              'acc_instrument_classifier')})
  add_standard_errors(out, counts)
  log(f'[evaluate] metrics computed ({time.time() - t0:.1f}s)')

  extras = {'entries': entries, 'pitch': gpitch,
            'instrument': ginst, 'nn_idx': g_idx, 'nn_dist': g_dist, 'train_split': train_split,
            'vocab': vocab[config.data.instrument_label], 'workdir': workdir,
            'triples': triples}
  return out, extras


def grid_cells(config, extras):
  """At most report_grid pitches x instruments, each the first sample of that pair, with its
  nearest training note (spectrogram + audio)."""
  g = max(1, int(config.evaluate.report_grid))
  pitch, inst = extras['pitch'], extras['instrument']

  def pick(values):
    u = np.unique(values)
    if len(u) > g:
      u = u[np.unique(np.round(np.linspace(0, len(u) - 1, g)).astype(int))]
    return [int(v) for v in u]
  ps, ins = pick(pitch), pick(inst)
  chosen = {}
  for i, (p, q) in enumerate(zip(pitch, inst)):
    if int(p) in ps and int(q) in ins and (int(p), int(q)) not in chosen:
      chosen[(int(p), int(q))] = i
  split = extras['train_split']
  order = sorted(chosen.items())
  nn_js = [int(extras['nn_idx'][i]) for _, i in order]
  nn_waves = source_audio(config, split, nn_js) if nn_js else []
  gen_waves, _ = load_waves(config, extras['workdir'], [extras['entries'][i] for _, i in order])
  cells = {}
  for ((p, q), i), j, w, gw in zip(order, nn_js, nn_waves, gen_waves):
    r = split.record(j)
    cells[(p, q)] = {
        'file': extras['entries'][i]['file'], 'spec': spec_lib.spectrogram(gw, config.spectrogram),
        'wave': gw, 'seed': extras['entries'][i].get('seed'),
        'nn': {'name': r['name'], 'spec': r['spec'], 'wave': w,
               'dist': float(extras['nn_dist'][i])}}
  return {'pitches': ps, 'instruments': [extras['vocab'][q] for q in ins],
          'instrument_ids': ins, 'cells': cells}


def _json_value(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None  # JSON has no NaN; null = undefined for these inputs
  return v


def run(config, workdir, log=progress.say):
  edir = workdir_lib.eval_dir(workdir)
  fp = fingerprint(config, workdir)
  workdir_lib.claim(edir, fp, NAME)
  for t in classifiers.TARGETS:
    classifiers.train(config, workdir, t, log=log)
  mesh = partitioning.make_mesh(config)
  out, extras = compute(config, workdir, mesh, log=log)
  if jax.process_index() == 0:
    fs.write_text(fs.join(edir, workdir_lib.METRICS_JSON),
                  json.dumps({k: _json_value(v) for k, v in out.items()}, indent=1,
                             sort_keys=True))
    grid = grid_cells(config, extras)
    names = extras['vocab']
    triples = [{**t, 'instrument': names[t['instrument']]} for t in extras['triples']]
    report.write_report(config, workdir, out, grid, triples)
    workdir_lib.mark_complete(edir, fp)
  return out
