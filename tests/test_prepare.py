"""The `prepare` stage: shards + manifest, bad-input rules, resumption, determinism."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import load_config, quiet, read_split, small_synthetic_config
from mars_jax.audio.spectrogram import spectrogram
from mars_jax.data import prepare as data_prepare
from mars_jax.stages import prepare


# --- NSynth layout ------------------------------------------------------------------------------

NSYNTH_NOTES = [  # (instrument_str, family, source, pitch, velocity, split)
    ('brass_acoustic_001', 'brass', 'acoustic', 60, 100, 'train'),
    ('brass_acoustic_001', 'brass', 'acoustic', 62, 50, 'train'),
    ('guitar_acoustic_007', 'guitar', 'acoustic', 64, 100, 'train'),
    ('guitar_electronic_002', 'guitar', 'electronic', 60, 100, 'train'),  # source filtered
    ('flute_acoustic_003', 'flute', 'acoustic', 30, 100, 'train'),        # pitch filtered
    ('flute_acoustic_003', 'flute', 'acoustic', 67, 25, 'train'),         # velocity filtered
    ('flute_acoustic_003', 'flute', 'acoustic', 65, 100, 'valid'),
    ('brass_acoustic_001', 'brass', 'acoustic', 70, 127, 'test'),
]
FAMILY_IDS = {'bass': 0, 'brass': 1, 'flute': 2, 'guitar': 3}


def _write_nsynth(root):
  """A tiny corpus in NSynth's layout: 16 kHz int16 wavs + examples.json with its fields."""
  meta = {s: {} for s in ('train', 'valid', 'test')}
  waves = {}
  for i, (inst, fam, src, pitch, vel, split) in enumerate(NSYNTH_NOTES):
    note = f'{inst}-{pitch:03d}-{vel:03d}'
    d = root / f'nsynth-{split}' / 'audio'
    d.mkdir(parents=True, exist_ok=True)
    from mars_jax.data.synthetic import synth_note
    w = synth_note(pitch, fam, vel, 16000, 16384, np.random.default_rng(i))
    sf.write(str(d / f'{note}.wav'), w, 16000, subtype='PCM_16')
    waves[note] = str(d / f'{note}.wav')
    meta[split][note] = {
        'note': i, 'note_str': note, 'instrument': i // 2, 'instrument_str': inst,
        'pitch': pitch, 'velocity': vel, 'sample_rate': 16000,
        'instrument_source': ('acoustic', 'electronic', 'synthetic').index(src),
        'instrument_source_str': src, 'instrument_family': FAMILY_IDS[fam],
        'instrument_family_str': fam, 'qualities': [0] * 10, 'qualities_str': []}
  for split, m in meta.items():
    (root / f'nsynth-{split}' / 'examples.json').write_text(json.dumps(m))
  return waves


@pytest.mark.parametrize('where', ['folder', 'bucket'])
def test_prepare_nsynth_layout(tmp_path, monkeypatch, where):
  c = load_config('tiny')   # 8 kHz: the 16 kHz files are resampled
  c.data.source = 'nsynth'
  if where == 'bucket':     # NSynth copied to a bucket, read from there (the GCS stand-in)
    from tests import fake_gcs
    fake_gcs.use(tmp_path, monkeypatch)
    waves = _write_nsynth(tmp_path / 'corpus' / 'nsynth')
    c.data.path = 'gs://corpus/nsynth'
  else:
    waves = _write_nsynth(tmp_path / 'nsynth')
    c.data.path = str(tmp_path / 'nsynth')
  c.data.pitch_range = (48, 84)
  c.data.instrument_sources = ('acoustic',)
  c.data.velocities = (50, 100, 127)
  c.data.prepare_workers = 1
  m = prepare.run(c, str(tmp_path / 'work'), log=quiet)
  assert prepare.is_complete(c, str(tmp_path / 'work'))
  assert {s: v['count'] for s, v in m['splits'].items()} == {'train': 3, 'valid': 1, 'test': 1}
  assert m['splits']['train']['filtered'] == 3
  assert m['vocab']['family'] == ['brass', 'flute', 'guitar']
  assert m['vocab']['instrument'] == ['brass_acoustic_001', 'flute_acoustic_003',
                                      'guitar_acoustic_007']
  assert m['vocab']['pitch_range'] == [48, 84]
  assert m['spectrogram']['shape'] == [128, 128] and m['spectrogram']['dtype'] == 'float16'
  assert m['fixed']['resampled'] == 5 and m['skipped'] == []
  assert m['config_hash'] == data_prepare.config_hash(c)
  recs = read_split(str(tmp_path / 'work'), m, 'train')
  assert [r['name'] for r in recs] == ['brass_acoustic_001-060-100', 'brass_acoustic_001-062-050',
                                       'guitar_acoustic_007-064-100']
  assert [int(r['pitch']) for r in recs] == [60, 62, 64]
  assert [int(r['velocity']) for r in recs] == [100, 50, 100]
  assert [m['vocab']['family'][r['family']] for r in recs] == ['brass', 'brass', 'guitar']
  assert m['vocab']['instrument'][recs[2]['instrument']] == 'guitar_acoustic_007'
  import librosa
  for r in recs + read_split(str(tmp_path / 'work'), m, 'test'):
    wav, sr = sf.read(waves[r['name']], dtype='float32')
    want = spectrogram(librosa.resample(wav, orig_sr=sr, target_sr=8000)[:8192], c.spectrogram)
    assert r['spec'].dtype == np.float16 and r['spec'].shape == (128, 128)
    np.testing.assert_array_equal(r['spec'], want.astype(np.float16))


# --- bad inputs through the folder source -------------------------------------------------------

def test_prepare_bad_corpus(tmp_path):
  root = tmp_path / 'corpus'
  root.mkdir()
  sr, n = 8000, 8192
  t = np.arange(n) / sr
  tone = (0.5 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
  sf.write(str(root / 'good.wav'), tone, sr)
  (root / 'empty.wav').write_bytes(b'')
  raw = (root / 'good.wav').read_bytes()
  (root / 'trunc.wav').write_bytes(raw[:len(raw) // 3])
  (root / 'random.wav').write_bytes(np.random.default_rng(1).bytes(5000))
  (root / 'readme.txt').write_text('these are my notes\n')
  nan = tone.copy()
  nan[50] = np.nan
  sf.write(str(root / 'nan.wav'), nan, sr, subtype='FLOAT')
  sf.write(str(root / 'silence.wav'), np.zeros(n, np.float32), sr)
  t44 = np.arange(int(1.024 * 44100)) / 44100
  sf.write(str(root / 'hi_rate.wav'), 0.5 * np.sin(2 * np.pi * 330 * t44), 44100)
  sf.write(str(root / 'stereo.wav'), np.stack([tone, 0.5 * tone], 1), sr)
  sf.write(str(root / 'short.wav'), tone[:2000], sr)
  sf.write(str(root / 'long.wav'), np.tile(tone, 4), sr)
  sf.write(str(root / 'nolabel.wav'), tone, sr)
  sf.write(str(root / 'orphan.wav'), tone, sr)
  rows = ['file,pitch,instrument,split']
  for f in ('good.wav', 'empty.wav', 'trunc.wav', 'random.wav', 'readme.txt', 'nan.wav',
            'silence.wav', 'hi_rate.wav', 'stereo.wav', 'short.wav', 'long.wav'):
    rows.append(f'{f},64,inst_a,train')
  rows.append('nolabel.wav,,inst_a,train')
  (root / 'labels.csv').write_text('\n'.join(rows) + '\n')

  c = load_config('tiny')
  c.data.source = 'folder'
  c.data.path = str(root)
  c.data.prepare_workers = 1
  m = prepare.run(c, str(tmp_path / 'work'), log=quiet)
  assert m['splits']['train']['count'] == 5
  assert m['fixed'] == {'resampled': 1, 'downmixed': 1, 'padded': 1, 'cropped': 1}
  reasons = {s['file']: s['reason'] for s in m['skipped']}
  kinds = {f: r.split(':')[0] for f, r in reasons.items()}
  assert kinds == {'empty.wav': 'unreadable', 'trunc.wav': 'unreadable',
                   'random.wav': 'unreadable', 'readme.txt': 'unreadable',
                   'nan.wav': 'non-finite', 'silence.wav': 'silent',
                   'nolabel.wav': 'missing labels', 'orphan.wav': 'missing labels'}
  assert 'truncated' in reasons['trunc.wav'] and 'empty' in reasons['empty.wav']
  assert m['skipped_counts'] == {'missing labels': 2, 'non-finite': 1, 'silent': 1,
                                 'unreadable': 4}
  recs = {r['name']: r for r in read_split(str(tmp_path / 'work'), m, 'train')}
  assert sorted(recs) == ['good.wav', 'hi_rate.wav', 'long.wav', 'short.wav', 'stereo.wav']
  want = spectrogram(sf.read(str(root / 'good.wav'), dtype='float32')[0],
                     c.spectrogram).astype(np.float16)
  np.testing.assert_array_equal(recs['good.wav']['spec'], want)
  np.testing.assert_array_equal(recs['long.wav']['spec'], want)
  assert np.abs(recs['stereo.wav']['spec'].astype(np.float32) - want).max() < 0.1
  assert m['vocab']['instrument'] == ['inst_a'] and m['vocab']['family'] == ['inst_a']


# --- tiny config: completeness, invalidation, resumption, determinism ---------------------------

@pytest.fixture(scope='module')
def tiny_prepared(tmp_path_factory):
  work = str(tmp_path_factory.mktemp('tiny'))
  c = load_config('tiny')
  c.data.prepare_workers = 2
  m = prepare.run(c, work, log=quiet)
  return c, work, m


def test_tiny_prepare_complete(tiny_prepared):
  c, work, m = tiny_prepared
  assert prepare.is_complete(c, work)
  assert {s: v['count'] for s, v in m['splits'].items()} == {'train': 576, 'valid': 72, 'test': 72}
  assert m['skipped'] == [] and m['spectrogram']['shape'] == [128, 128]
  assert m['normalisation']['log_lo'] == pytest.approx(np.log(1e-5))
  assert m['bytes'] == sum(os.path.getsize(os.path.join(work, 'data', s))
                           for v in m['splits'].values() for s in v['shards'])
  recs = read_split(work, m, 'valid')
  assert len(recs) == 72
  specs = np.stack([r['spec'] for r in recs]).astype(np.float32)
  assert specs.min() >= -1 and specs.max() <= 1 and specs.std() > 0.1
  assert {int(r['family']) for r in recs} == set(range(4))
  with open(os.path.join(work, 'data', 'manifest.json')) as f:
    assert json.load(f) == m
  for field, value in [('silence_db', -50.0), ('pitch_range', (48, 70)),
                       ('examples_per_shard', 128)]:
    c2 = load_config('tiny')
    c2.data[field] = value
    assert not prepare.is_complete(c2, work), field
  c2 = load_config('tiny')
  c2.spectrogram.log_eps = 1e-4
  assert not prepare.is_complete(c2, work)
  assert prepare.run(c, work, log=quiet) == m   # complete: nothing redone


def test_resume_after_kill(tmp_path, monkeypatch):
  c = small_synthetic_config()
  work = str(tmp_path / 'w')
  real = data_prepare.prepare_shard
  calls = []

  def dying(task, params, d):
    calls.append(task['stem'])
    if len(calls) == 3:
      raise KeyboardInterrupt('killed')
    return real(task, params, d)

  monkeypatch.setattr(data_prepare, 'prepare_shard', dying)
  with pytest.raises(KeyboardInterrupt):
    prepare.run(c, work, log=quiet)
  monkeypatch.setattr(data_prepare, 'prepare_shard', real)
  d = os.path.join(work, 'data')
  assert not os.path.exists(os.path.join(d, 'manifest.json'))
  assert not prepare.is_complete(c, work)
  assert not [f for f in os.listdir(d) if '.tmp-' in f]
  first = sorted(f for f in os.listdir(d) if f.endswith('.array_record'))
  assert first == sorted(s + '.array_record' for s in calls[:2])
  mtimes = {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in first}

  m = prepare.run(c, work, log=quiet)
  assert prepare.is_complete(c, work)
  assert {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in first} == mtimes
  total = sum(v['count'] for v in m['splits'].values())
  assert total == 4 * 2 * 2 / 0.8

  # Lose the manifest and one shard (and corrupt another's sidecar): only those are redone.
  ref = {f: open(os.path.join(d, f), 'rb').read() for f in os.listdir(d)
         if f.endswith('.array_record')}
  os.remove(os.path.join(d, 'manifest.json'))
  os.remove(os.path.join(d, m['splits']['train']['shards'][1]))
  stale = m['splits']['valid']['shards'][0].replace('.array_record', '.done.json')
  with open(os.path.join(d, stale), 'w') as f:
    f.write('{"hash": "x"}')
  keep = [f for f in ref if f not in (m['splits']['train']['shards'][1],
                                      m['splits']['valid']['shards'][0])]
  mtimes = {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in keep}
  assert not prepare.is_complete(c, work)
  m2 = prepare.run(c, work, log=quiet)
  assert m2 == m and prepare.is_complete(c, work)
  assert {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in keep} == mtimes
  assert {f: open(os.path.join(d, f), 'rb').read() for f in ref} == ref

  # A changed data field: manifest invalid, shards whose content changed are rebuilt.
  c.data.synthetic.per_pitch_family = 3
  assert not prepare.is_complete(c, work)
  m3 = prepare.run(c, work, log=quiet)
  assert sum(v['count'] for v in m3['splits'].values()) == 30
  assert sorted(f for f in os.listdir(d) if f.endswith('.array_record')) == sorted(
      s for v in m3['splits'].values() for s in v['shards'])


def test_same_output_with_1_and_2_workers(tmp_path):
  out = {}
  for w in (1, 2):
    c = small_synthetic_config(prepare_workers=w)
    work = str(tmp_path / f'w{w}')
    prepare.run(c, work, log=quiet)
    d = os.path.join(work, 'data')
    out[w] = {f: open(os.path.join(d, f), 'rb').read() for f in sorted(os.listdir(d))
              if not f.endswith('.done.json')}
  assert len(out[1]) == 1 + 4 + 1 + 1   # manifest + train shards + valid + test
  m1, m2 = (json.loads(out[w].pop('manifest.json')) for w in (1, 2))
  m1.pop('config_hash'), m2.pop('config_hash')   # the hash covers data.prepare_workers
  assert m1 == m2
  assert out[1] == out[2]


def test_bad_path_is_config_error(tmp_path):
  from mars_jax.config import ConfigError
  c = load_config('tiny')
  c.data.source = 'nsynth'
  c.data.path = str(tmp_path / 'missing')
  with pytest.raises(ConfigError, match='data.path'):
    prepare.run(c, str(tmp_path / 'w'), log=quiet)
  assert not prepare.is_complete(c, str(tmp_path / 'w'))
