"""The evaluate stage end to end on a small prepared workdir.

"Generated" notes are real held-out notes written as wav: the generated metrics must then land
on the real ceiling, and a collapsed set (one note repeated) must score worse.
"""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from mars_jax import config as config_lib
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.data import audio_io, sources
from mars_jax.evaluate import classifiers
from mars_jax.stages import evaluate, prepare

from tests.helpers import load_config

KEYS = ('pis', 'iis', 'pkid', 'ikid', 'ndb_k', 'ndb_js', 'fad_clf_pitch', 'fad_clf_instrument',
        'pitch_exact', 'pitch_within_semitone', 'pitch_detected', 'clf_pitch_match',
        'clf_instrument_match')


def small_config():
  c = load_config('tiny')
  c.data.pitch_range = (48, 59)
  c.data.synthetic.per_pitch_family = 3
  c.data.synthetic.test_fraction = 0.25
  c.data.prepare_workers = 1
  c.tokenizer.train.steps = 4
  c.tokenizer.train.checkpoint_every = 4
  c.tokenizer.train.eval_every = 4
  c.classifier.train.steps = 60
  c.classifier.train.checkpoint_every = 30
  c.classifier.train.eval_every = 60
  c.classifier.train.lr = 3e-3
  c.evaluate.report_grid = 3
  return c


def write_samples(config, workdir, notes):
  """notes: [(wave, pitch, instrument name)] -> DIR/samples/*.wav + samples.json."""
  sdir = os.path.join(workdir, 'samples')
  shutil.rmtree(sdir, ignore_errors=True)
  os.makedirs(sdir)
  entries = []
  for i, (w, p, name) in enumerate(notes):
    fn = f'{i:04d}.wav'
    sf.write(os.path.join(sdir, fn), w, int(config.spectrogram.sample_rate), subtype='PCM_16')
    entries.append({'file': fn, 'pitch': int(p), 'instrument': name, 'seed': i, 'cfg': 1.0,
                    'top_k': 0, 'top_p': 1.0})
  with open(os.path.join(sdir, 'samples.json'), 'w') as f:
    json.dump(entries, f)


def held_out_notes(config):
  sr = int(config.spectrogram.sample_rate)
  n = int(round(sr * config.spectrogram.duration))
  out = []
  for e in sources.get_source(config).examples('test'):
    w, _ = audio_io.load_clip(e.load, sr, n)
    out.append((w, e.labels['pitch'], e.labels[config.data.instrument_label]))
  return out


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """Prepared data + a briefly trained tokenizer, shared by the tests below."""
  d = str(tmp_path_factory.mktemp('evalwd'))
  c = small_config()
  prepare.run(c, d, log=lambda *a: None)
  untrained_tokenizer_checkpoint(c, d)
  return d


def untrained_tokenizer_checkpoint(config, workdir):
  """evaluate only needs *a* tokenizer checkpoint (for mse/mae); training one is the tokenizer
  tests' job, so save small random params in the layout restore_params reads (state/params)."""
  import jax
  from mars_jax.train import checkpoint, partitioning
  shapes = config_lib.derive(config)
  model = trained.build_tokenizer(config, shapes)
  x = np.zeros((1,) + shapes.image, np.float32)
  rng = jax.random.PRNGKey(0)
  shapes_only = jax.eval_shape(lambda r: model.init({'params': r, 'dropout': r}, x), rng)
  gen = np.random.default_rng(0)  # jitting the real init costs ~50 s of compile on 2 cores
  params = jax.tree.map(lambda a: (0.05 * gen.standard_normal(a.shape)).astype(a.dtype),
                        partitioning.unbox(shapes_only['params']))
  mngr = checkpoint.manager(checkpoint.ckpt_dir(os.path.join(workdir, 'tokenizer')))
  checkpoint.save(mngr, 0, {'step': np.int32(0), 'params': params})
  mngr.wait_until_finished()
  mngr.close()


def _clone(src, dst):
  """A second workdir sharing the prepared data, tokenizer and trained classifiers."""
  os.makedirs(os.path.join(dst, 'eval'))
  for name in ('data', 'tokenizer'):
    os.symlink(os.path.join(src, name), os.path.join(dst, name))
  for t in classifiers.TARGETS:
    shutil.copytree(workdir_lib.classifier_dir(src, t), workdir_lib.classifier_dir(dst, t))


# An accuracy (a fraction of notes), by name, whatever its prefix (real_, gl_, recon_ or none).
ACCURACY = re.compile(r'^(real_|gl_|recon_)?(pitch_(exact|within_semitone|detected)'
                      r'|clf_(pitch|instrument)_match)$|^acc_\w+_classifier$')


def check_ceilings(config, m, workdir):
  """metrics.json's ceilings contract and report.html's table and listening triples."""
  for k in ('pitch_within_semitone', 'recon_pitch_within_semitone', 'gl_pitch_within_semitone',
            'real_pitch_within_semitone'):   # the ceilings README.md documents
    assert k in m and 0.0 <= m[k] <= 1.0, k
  accuracies = [k for k in m if ACCURACY.match(k)]
  assert len(accuracies) == 4 * 5 + 2, sorted(accuracies)   # 4 columns x 5 estimators + 2
  for k in accuracies:   # every accuracy carries its standard error and its n
    n = m[k + '_n']
    assert n >= 1 and m[k + '_se'] == pytest.approx(math.sqrt(m[k] * (1 - m[k]) / n)), k
  n_test = m['num_real_test']
  assert m['num_ceiling'] == min(n_test, config.evaluate.ceiling_notes)
  assert m['gl_pitch_within_semitone_n'] == m['num_ceiling'] == m['recon_clf_pitch_match_n']
  assert m['real_clf_pitch_match_n'] == n_test and m['pitch_exact_n'] == m['num_generated']
  # Clean synthetic notes survive Griffin-Lim; an untrained tokenizer loses them.
  assert m['gl_pitch_within_semitone'] >= 0.9
  assert m['recon_pitch_within_semitone'] < m['gl_pitch_within_semitone'] - 0.3
  assert m['gl_mse'] < m['recon_audio_mse'] and m['recon_mse'] > 0
  with open(os.path.join(workdir, 'report.html'), encoding='utf-8') as f:
    page = f.read()
  assert '<table class="ceilings">' in page and 'Griffin-Lim of the true spectrogram' in page
  triples = re.search(r'<table class="triples">(.*?)</table>', page, re.S).group(1)
  families = len(config.data.synthetic.families)
  shown = min(families, config.evaluate.report_grid) * config.evaluate.report_triples
  assert triples.count('<tr>') == 1 + shown                     # header + one row a note
  assert triples.count('<audio') == triples.count('<img') == 3 * shown
  rows = re.findall(r'<th>(\w+), MIDI', triples)
  assert len(rows) == shown and set(rows) <= set(config.data.synthetic.families)


@pytest.mark.slow
def test_metrics_real_notes_reach_the_ceiling_and_collapse_is_worse(workdir, tmp_path):
  c = small_config()
  notes = held_out_notes(c)
  write_samples(c, workdir, notes)
  assert not evaluate.is_complete(c, workdir)
  evaluate.run(c, workdir, log=lambda *a: None)
  assert evaluate.is_complete(c, workdir)
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    m = json.load(f)
  want = set(KEYS) | {'real_' + k for k in KEYS} | {
      'mse', 'mae', 'nn_dist_generated', 'nn_dist_real', 'acc_pitch_classifier',
      'acc_instrument_classifier', 'num_generated', 'num_real_train', 'num_real_test'}
  assert want <= set(m), sorted(want - set(m))
  bad = {k: v for k, v in m.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
  assert not bad, bad
  counts = workdir_lib.load_manifest(workdir)['splits']
  assert m['num_generated'] == len(notes) == counts['test']['count']
  assert m['num_real_train'] == counts['train']['count']
  assert m['num_real_test'] == counts['test']['count']
  # Same notes, through wav files: the generated metrics equal the real ceiling.
  assert m['pitch_within_semitone'] >= 0.9 and m['real_pitch_within_semitone'] >= 0.9
  for k in ('pis', 'iis'):
    assert abs(m[k] - m['real_' + k]) < 0.05 * m['real_' + k], (k, m[k], m['real_' + k])
  assert abs(m['ndb_k'] - m['real_ndb_k']) <= 0.1
  assert abs(m['nn_dist_generated'] - m['nn_dist_real']) < 0.05
  assert m['acc_pitch_classifier'] > 1.5 / 12  # better than chance after a few steps
  check_ceilings(c, m, workdir)
  # Skipped when complete; new samples invalidate.
  for t in classifiers.TARGETS:
    assert workdir_lib.is_complete(workdir_lib.classifier_dir(workdir, t),
                                   workdir_lib.classifier_fingerprint(c, t))

  write_samples(c, workdir, notes[:-1])  # new samples: the result no longer matches
  assert not evaluate.is_complete(c, workdir)

  other = str(tmp_path / 'collapsed')
  _clone(workdir, other)
  write_samples(c, other, [notes[0]] * len(notes))
  evaluate.run(c, other, log=lambda *a: None)
  with open(os.path.join(other, 'eval', 'metrics.json')) as f:
    mc = json.load(f)
  assert mc['ndb_k'] > m['ndb_k'] and mc['ndb_js'] > m['ndb_js'] + 0.1, (mc, m)
  assert mc['pis'] < m['pis'] - 0.2 and mc['pis'] < 1.05
  assert mc['pkid'] > m['pkid']
  # The real ceiling does not depend on the samples.
  assert mc['real_pis'] == pytest.approx(m['real_pis'])


def test_batched_apply_pads_a_few_notes_to_a_small_batch_and_keeps_every_row():
  """A handful of notes runs as the next power-of-two multiple of the data-parallel size, not a
  whole batch of 64 (most of it padding); many notes still run in batches of 64. Every row comes
  back, in order, equal to the function applied to it alone."""
  import jax
  import jax.numpy as jnp
  from mars_jax.train import partitioning
  mesh = partitioning.make_mesh(load_config('tiny'))
  dp = mesh.shape['data'] * mesh.shape['fsdp']
  seen = []

  def fn(p, x):
    seen.append(x.shape[0])                     # once per traced (compiled) batch shape
    return {'sum': jnp.sum(x, (1, 2, 3)) * p, 'first': x[:, 0, 0, 0]}

  jitted = jax.jit(fn, out_shardings=partitioning.replicated(mesh))
  rng = np.random.default_rng(0)
  for n in (1, 3, dp + 1, 70):
    images = rng.normal(size=(n, 2, 3, 1)).astype(np.float32)
    out = classifiers.batched_apply(jitted, np.float32(2.0), images, mesh, batch_size=64)
    np.testing.assert_allclose(out['sum'], images.sum((1, 2, 3)) * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(out['first'], images[:, 0, 0, 0])
  full = -(-64 // dp) * dp                      # 64 rounded up to whole shards

  def expected(n):                              # the least dp * 2^j holding n, at most `full`
    j = 0
    while dp * 2 ** j < n:
      j += 1
    return min(dp * 2 ** j, full)
  assert seen == sorted({expected(n) for n in (1, 3, dp + 1, 70)}), (seen, dp)
