"""Sources, synthetic notes and the audio loading rules, without running `prepare`."""
import itertools
import os

import numpy as np
import pytest
import soundfile as sf

from mars_jax.config import ConfigError
from mars_jax.data import audio_io, sources, synthetic


def _profile(wave, sr, f0, n=6):
  """First n harmonic amplitudes (unit norm) over the first half of the note."""
  x = wave[:len(wave) // 2] * np.hanning(len(wave) // 2)
  mag = np.abs(np.fft.rfft(x))
  f = np.fft.rfftfreq(len(x), 1 / sr)
  a = np.array([mag[np.abs(f - k * f0) < f0 / 4].max() for k in range(1, n + 1)])
  return a / np.linalg.norm(a)


def test_synth_note_deterministic_and_bounded():
  for fam in synthetic.NSYNTH_FAMILIES:
    a = synthetic.synth_note(60, fam, 100, 8000, 8192, np.random.default_rng(3), instrument=1)
    b = synthetic.synth_note(60, fam, 100, 8000, 8192, np.random.default_rng(3), instrument=1)
    c = synthetic.synth_note(60, fam, 100, 8000, 8192, np.random.default_rng(4), instrument=1)
    assert a.dtype == np.float32 and a.shape == (8192,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.isfinite(a).all() and 0.05 < np.abs(a).max() <= 1.0
  soft = synthetic.synth_note(60, 'organ', 25, 8000, 8192, np.random.default_rng(0))
  loud = synthetic.synth_note(60, 'organ', 127, 8000, 8192, np.random.default_rng(0))
  assert np.abs(loud).max() > 2 * np.abs(soft).max()


def test_families_have_different_timbres():
  sr, pitch = 8000, 57
  profiles = {f: _profile(synthetic.synth_note(pitch, f, 100, sr, 8192, np.random.default_rng(0)),
                          sr, synthetic.midi_hz(pitch))
              for f in ('brass', 'flute', 'guitar', 'organ', 'reed', 'vocal')}
  for a, b in itertools.combinations(profiles, 2):
    assert np.linalg.norm(profiles[a] - profiles[b]) > 0.2, (a, b)
  # Recognisable traits: flute nearly a sine, reed mostly odd harmonics.
  assert profiles['flute'][0] > 0.95
  assert profiles['reed'][[0, 2, 4]].sum() > 3 * profiles['reed'][[1, 3, 5]].sum()
  # Guitar decays (plucked), organ sustains.
  g = synthetic.synth_note(pitch, 'guitar', 100, sr, 8192, np.random.default_rng(0))
  o = synthetic.synth_note(pitch, 'organ', 100, sr, 8192, np.random.default_rng(0))
  late = slice(5000, 6000)
  assert np.abs(g[late]).max() < 0.3 * np.abs(g).max()
  assert np.abs(o[late]).max() > 0.7 * np.abs(o).max()
  # Instruments of one family differ, but less than families do.
  i0, i1 = (_profile(synthetic.synth_note(pitch, 'brass', 100, sr, 8192, np.random.default_rng(0),
                                          instrument=i), sr, synthetic.midi_hz(pitch))
            for i in (0, 1))
  assert 0 < np.linalg.norm(i0 - i1) < np.linalg.norm(profiles['brass'] - profiles['flute'])


def test_synthetic_source_listing(tiny_config):
  src = sources.get_source(tiny_config)
  again = sources.get_source(tiny_config)
  counts = {s: len(src.examples(s)) for s in sources.SPLITS}
  assert counts == {'train': 24 * 4 * 6, 'valid': 72, 'test': 72}
  names = [e.name for s in sources.SPLITS for e in src.examples(s)]
  assert len(set(names)) == len(names)
  for s in sources.SPLITS:
    assert [(e.name, e.labels) for e in src.examples(s)] == \
        [(e.name, e.labels) for e in again.examples(s)]
  ex = src.examples('valid')[5]
  w1, sr = ex.load()
  w2, _ = again.examples('valid')[5].load()
  assert sr == 8000 and w1.shape == (8192,)
  np.testing.assert_array_equal(w1, w2)
  fams = {e.labels['family'] for e in src.examples('train')}
  assert fams == set(tiny_config.data.synthetic.families)
  assert {e.labels['pitch'] for e in src.examples('valid')} <= set(range(48, 72))
  voc = sources.vocab(src)
  assert voc['family'] == sorted(fams) and len(voc['instrument']) == 4 * 3
  tiny_config.seed = 1
  other = sources.get_source(tiny_config).examples('valid')[5].load()[0]
  assert not np.array_equal(w1, other)


def test_nsynth_missing_layout_is_a_config_error(tiny_config, tmp_path):
  tiny_config.data.source = 'nsynth'
  tiny_config.data.path = ''
  with pytest.raises(ConfigError, match='data.path'):
    sources.get_source(tiny_config)
  tiny_config.data.path = str(tmp_path / 'nope')
  with pytest.raises(ConfigError, match='data.path.*nsynth-train'):
    sources.get_source(tiny_config)
  for s in sources.SPLITS:
    os.makedirs(tmp_path / f'nsynth-{s}' / 'audio')
  tiny_config.data.path = str(tmp_path)
  with pytest.raises(ConfigError, match='examples.json'):
    sources.get_source(tiny_config)
  for s in sources.SPLITS:
    (tmp_path / f'nsynth-{s}' / 'examples.json').write_text('{}')
  assert sources.get_source(tiny_config).examples('train') == []


def test_folder_source_csv(tiny_config, tmp_path):
  tiny_config.data.source = 'folder'
  tiny_config.data.path = str(tmp_path)
  with pytest.raises(ConfigError, match='labels'):
    sources.get_source(tiny_config)
  rows = ['file,pitch,instrument,family,velocity,split']
  for i in range(40):
    rows.append(f'n{i}.wav,{50 + i % 10},inst{i % 3},fam{i % 2},,')
  rows += ['a.wav,60,x,,80,test', 'b.wav,,x,,,train', 'c.wav,61,,,,', 'd.wav,200,x,,,train',
           'e.wav,60,x,,,bogus']
  (tmp_path / 'labels.csv').write_text('\n'.join(rows) + '\n')
  (tmp_path / 'orphan.wav').write_bytes(b'')
  src = sources.get_source(tiny_config)
  allx = {e.name: e for s in sources.SPLITS for e in src.examples(s)}
  assert len(allx) == 41
  assert allx['a.wav'].split == 'test' and allx['a.wav'].labels['velocity'] == 80
  assert allx['n0.wav'].labels == {'pitch': 50, 'velocity': 100, 'family': 'fam0',
                                   'instrument': 'inst0'}
  split_of = {n: e.split for n, e in allx.items()}
  assert {split_of[f'n{i}.wav'] for i in range(40)} >= {'train', 'valid'}
  assert split_of == {e.name: e.split for s in sources.SPLITS
                      for e in sources.get_source(tiny_config).examples(s)}
  reasons = {k['file']: k['reason'] for s in sources.SPLITS for k in src.skipped(s)}
  assert set(reasons) == {'b.wav', 'c.wav', 'e.wav', 'orphan.wav'}
  assert all(r.startswith('missing labels') for r in reasons.values())
  assert 'pitch' in reasons['b.wav'] and 'instrument' in reasons['c.wav']
  assert sum(src.filtered(s) for s in sources.SPLITS) == 1   # d.wav: pitch 200 out of range


def _write(path, wave, sr, subtype='PCM_16'):
  sf.write(str(path), wave, sr, subtype=subtype)
  return str(path)


def test_load_clip_rules(tmp_path):
  sr, n = 8000, 8192
  t = np.arange(n) / sr
  tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  w, fixes = audio_io.load_clip(_write(tmp_path / 'ok.wav', tone, sr), sr, n)
  assert fixes == [] and w.dtype == np.float32 and w.shape == (n,)
  np.testing.assert_allclose(w, tone, atol=1e-4)

  def reason(p):
    with pytest.raises(audio_io.BadAudio) as e:
      audio_io.load_clip(p, sr, n)
    return str(e.value)

  (tmp_path / 'empty.wav').write_bytes(b'')
  assert reason(tmp_path / 'empty.wav').startswith('unreadable: empty')
  assert reason(str(tmp_path / 'missing.wav')).startswith('unreadable')
  raw = open(tmp_path / 'ok.wav', 'rb').read()
  (tmp_path / 'trunc.wav').write_bytes(raw[:len(raw) // 2])
  assert reason(tmp_path / 'trunc.wav').startswith('unreadable: truncated')
  (tmp_path / 'head.wav').write_bytes(raw[:20])
  assert reason(tmp_path / 'head.wav').startswith('unreadable')
  (tmp_path / 'junk.wav').write_bytes(np.random.default_rng(0).bytes(3000))
  assert reason(tmp_path / 'junk.wav').startswith('unreadable')
  (tmp_path / 'text.wav').write_text('not audio at all\n' * 50)
  assert reason(tmp_path / 'text.wav').startswith('unreadable')
  bad = tone.copy()
  bad[100] = np.nan
  assert reason(_write(tmp_path / 'nan.wav', bad, sr, 'FLOAT')).startswith('non-finite')
  bad[100] = np.inf
  assert reason(_write(tmp_path / 'inf.wav', bad, sr, 'FLOAT')).startswith('non-finite')
  assert reason(_write(tmp_path / 'zero.wav', 0 * tone, sr)).startswith('silent')
  assert reason(_write(tmp_path / 'quiet.wav', 1e-4 * tone, sr)).startswith('silent')
  assert reason(lambda: (np.zeros((0,), np.float32), sr)).startswith('unreadable')

  t44 = np.arange(int(1.024 * 44100)) / 44100
  w, fixes = audio_io.load_clip(
      _write(tmp_path / 'r.wav', 0.5 * np.sin(2 * np.pi * 440 * t44), 44100), sr, n)
  assert fixes == ['resampled'] and w.shape == (n,)
  assert np.abs(w[1000:7000] - tone[1000:7000]).max() < 0.02
  w, fixes = audio_io.load_clip(_write(tmp_path / 's.wav', np.stack([tone, tone], 1), sr), sr, n)
  assert fixes == ['downmixed']
  np.testing.assert_allclose(w, tone, atol=1e-4)
  w, fixes = audio_io.load_clip(_write(tmp_path / 'short.wav', tone[:3000], sr), sr, n)
  assert fixes == ['padded'] and (w[3000:] == 0).all() and np.abs(w[:3000]).max() > 0.4
  w, fixes = audio_io.load_clip(_write(tmp_path / 'long.wav', np.tile(tone, 3), sr), sr, n)
  assert fixes == ['cropped'] and w.shape == (n,)
  w, fixes = audio_io.load_clip(lambda: (np.stack([tone[:100]] * 3, 1), 16000), sr, n)
  assert sorted(fixes) == ['downmixed', 'padded', 'resampled']
  assert audio_io.reason_kind('missing labels: pitch') == 'missing labels'


def test_load_clip_reads_a_bucket_like_a_folder(tmp_path, monkeypatch):
  """NSynth may sit in a bucket (data.path=gs://...): every rule gives the same wave or reason."""
  from tests import fake_gcs
  fake_gcs.use(tmp_path / 'root', monkeypatch)
  local = tmp_path / 'root' / 'b'
  local.mkdir(parents=True)
  sr, n = 8000, 8192
  tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)
  _write(local / 'ok.wav', tone, sr)
  _write(local / 'stereo_hi.wav', np.stack([tone, tone], 1), 16000)
  raw = (local / 'ok.wav').read_bytes()
  (local / 'trunc.wav').write_bytes(raw[:len(raw) // 2])
  (local / 'empty.wav').write_bytes(b'')
  (local / 'text.wav').write_text('not audio at all\n' * 50)
  _write(local / 'zero.wav', 0 * tone, sr)

  def result(p):
    try:
      return audio_io.load_clip(p, sr, n)
    except audio_io.BadAudio as e:
      return str(e).split(':')[0] + (': truncated' if 'truncated' in str(e) else '')

  for name in ('ok.wav', 'stereo_hi.wav', 'trunc.wav', 'empty.wav', 'text.wav', 'zero.wav',
               'missing.wav'):
    want, got = result(str(local / name)), result(f'gs://b/{name}')
    if isinstance(want, str):
      assert got == want, name
    else:
      np.testing.assert_array_equal(got[0], want[0])
      assert got[1] == want[1], name
  assert result('gs://b/trunc.wav') == 'unreadable: truncated'
