"""data.source='soundfont': GM programs rendered by FluidSynth from TimGM6mb (Debian package
timgm6mb-soundfont; .ci/run installs it with the FluidSynth library). Tests that render skip,
saying what to install, where the binding, the library or the file is absent."""
import json
import os

import numpy as np
import pytest

from tests.helpers import TIMGM6MB, load_config, needs_soundfont, quiet, read_split
from mars_jax import config as config_lib
from mars_jax.config import ConfigError
from mars_jax.data import audio_io, sources, soundfont
from mars_jax.stages import prepare


def _config(**data):
  """The tiny config (8 kHz, 1.024 s) on TimGM6mb, a few programs and pitches."""
  c = load_config('tiny')
  c.data.source = 'soundfont'
  c.data.path = TIMGM6MB
  c.data.pitch_range = (60, 62)
  c.data.soundfont.families = ('guitar', 'organ', 'vocal')
  c.data.prepare_workers = 1
  for k, v in data.items():
    section, _, field = k.partition('__')
    if field:
      c.data[section][field] = v
    else:
      c.data[k] = v
  return c


def _programs(src):
  """{split: {program}}."""
  out = {s: set() for s in sources.SPLITS}
  for p, (_, s) in src.programs.items():
    out[s].add(p)
  return out


# --- needs nothing ----------------------------------------------------------------------------

def test_missing_binding_says_what_to_install(monkeypatch):
  def absent():
    raise ImportError("Couldn't find the FluidSynth library.")
  monkeypatch.setattr(soundfont, 'library', absent)
  with pytest.raises(ConfigError, match=r"mars_jax\[soundfont\].*libfluidsynth3"):
    sources.get_source(_config())


def test_no_path_and_nothing_installed_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(soundfont, 'SEARCH', (str(tmp_path / 'none.sf2'), str(tmp_path / '*.sf2')))
  with pytest.raises(ConfigError, match='data.path is empty.*apt-get install timgm6mb-soundfont'
                                        '.*fluid-soundfont-gm.*--config.data.path'):
    soundfont.find_soundfont('')
  (tmp_path / 'b.sf2').write_bytes(b'x')
  (tmp_path / 'a.sf2').write_bytes(b'x')
  assert soundfont.find_soundfont('') == str(tmp_path / 'a.sf2')


@pytest.mark.parametrize('field,value', [
    ('families', ('guitar', 'kazoo')), ('families', ()), ('programs_per_family', -1),
    ('notes_per_pitch', -2), ('hold', 0.0), ('hold', 1.5), ('gain', 0.0),
    ('valid_fraction', 0.95), ('test_fraction', -0.1)])
def test_bad_field_is_named(field, value):
  c = _config(**{f'soundfont__{field}': value})
  with pytest.raises(ConfigError, match=f'data.soundfont.{field}'):
    config_lib.derive(c)


def test_bad_velocity_is_named():
  with pytest.raises(ConfigError, match='data.velocities'):
    config_lib.derive(_config(velocities=(0, 100)))


def test_split_assignment_by_program():
  """Per family: no program in two splits, held-out programs in valid and test, from the seed."""
  c = _config(soundfont__families=tuple(soundfont.PROGRAMS))
  a = soundfont.assign_programs(c)
  assert a == soundfont.assign_programs(c)
  assert set(a) == {p for progs in soundfont.PROGRAMS.values() for p in progs}
  for fam, progs in soundfont.PROGRAMS.items():
    splits = [a[p][1] for p in progs]
    assert all(a[p][0] == fam for p in progs)
    assert splits.count('valid') >= 1 and splits.count('test') >= 1, fam
    assert splits.count('train') >= len(progs) - 2 - round(0.2 * len(progs)), fam
  c.seed = 1
  b = soundfont.assign_programs(c)
  assert {p: s for p, (_, s) in b.items()} != {p: s for p, (_, s) in a.items()}
  c.data.soundfont.programs_per_family = 3
  c.data.soundfont.valid_fraction, c.data.soundfont.test_fraction = 0.0, 0.34
  three = soundfont.assign_programs(c)
  for fam in soundfont.PROGRAMS:
    assert sorted(s for p, (f, s) in three.items() if f == fam) == ['test', 'train', 'train']
  assert soundfont._held_out_counts(2, 0.1, 0.1) == (0, 0)
  assert soundfont._held_out_counts(3, 0.1, 0.1) == (1, 1)
  assert soundfont._held_out_counts(13, 0.1, 0.1) == (1, 1)
  assert soundfont._held_out_counts(20, 0.1, 0.2) == (2, 4)


def test_velocities_for():
  c = _config()
  assert soundfont.velocities_for(c, 24, 60) == soundfont.velocities_for(c, 24, 60)
  assert len(soundfont.velocities_for(c, 24, 60)) == 1
  assert {soundfont.velocities_for(c, 24, p)[0] for p in range(40, 80)} == {25, 50, 75, 100, 127}
  c.data.soundfont.notes_per_pitch = 0
  assert soundfont.velocities_for(c, 24, 60) == [25, 50, 75, 100, 127]
  c.data.velocities = (100, 40)
  assert soundfont.velocities_for(c, 24, 60) == [40, 100]


# --- needs FluidSynth and TimGM6mb --------------------------------------------------------------

@needs_soundfont
def test_labels_as_configured():
  c = _config(velocities=(60, 100), soundfont__notes_per_pitch=0)
  src = sources.get_source(c)
  assert src.path == TIMGM6MB and len(src.digest) == 64
  want = {p for f in ('guitar', 'organ', 'vocal') for p in soundfont.PROGRAMS[f]}
  assert set(src.programs) == want
  seen = set()
  for split in sources.SPLITS:
    for e in src.examples(split):
      lab = e.labels
      program = int(lab['instrument'][-3:])
      assert src.programs[program] == (lab['family'], split)
      assert lab['instrument'] == soundfont.instrument_name(lab['family'], program)
      assert lab['pitch'] in (60, 61, 62) and lab['velocity'] in (60, 100)
      assert e.name == f'{lab["instrument"]}-{lab["pitch"]:03d}-{lab["velocity"]:03d}'
      seen.add(e.name)
  assert len(seen) == len(want) * 3 * 2
  assert soundfont.instrument_name('guitar', 24) == 'guitar_acoustic_024'
  assert soundfont.instrument_name('synth_lead', 81) == 'synth_lead_synthetic_081'
  voc = sources.vocab(src, c)
  assert voc['family'] == ['guitar', 'organ', 'vocal']
  assert len(voc['instrument']) == len(want)
  info = src.info()
  assert info['soundfont'] == TIMGM6MB and info['missing_programs'] == []
  assert info['programs']['guitar_acoustic_024']['preset'] == 'Nylon Guitar'
  # One velocity per (program, pitch) by default; programs_per_family picks programs.
  c = _config(soundfont__programs_per_family=3)
  src = sources.get_source(c)
  assert len(src.programs) == 9
  assert all(len([e for e in src.examples(s) if e.labels['pitch'] == 60
                  and e.labels['instrument'] == ex.labels['instrument']]) == 1
             for s in sources.SPLITS for ex in src.examples(s))


@needs_soundfont
def test_splits_by_program_deterministic_from_seed():
  c = _config(soundfont__families=tuple(soundfont.PROGRAMS))
  a, b = sources.get_source(c), sources.get_source(c)
  pa = _programs(a)
  assert pa == _programs(b)
  assert all(pa[s] for s in sources.SPLITS)
  assert not (pa['train'] & pa['valid'] or pa['train'] & pa['test'] or pa['valid'] & pa['test'])
  for s in sources.SPLITS:
    insts = {e.labels['instrument'] for e in a.examples(s)}
    assert {int(i[-3:]) for i in insts} == pa[s]
    assert [e.name for e in a.examples(s)] == [e.name for e in b.examples(s)]
  c.seed = 1
  assert _programs(sources.get_source(c)) != pa


@needs_soundfont
def test_same_seed_same_audio_bit_exact():
  """A note is a pure function of its arguments: the same in any order, after any other note."""
  src = sources.get_source(_config())
  notes = [e for s in sources.SPLITS for e in src.examples(s)][:6]
  first = [e.load()[0] for e in notes]
  again = [e.load()[0] for e in reversed(notes)][::-1]
  for e, x, y in zip(notes, first, again):
    assert x.dtype == np.float32 and x.shape == (8192,)
    np.testing.assert_array_equal(x, y, err_msg=e.name)
    assert 0.003 < np.abs(x).max() < 1.0, e.name
  fresh = sources.get_source(_config()).examples(notes[0].split)
  np.testing.assert_array_equal(
      next(e for e in fresh if e.name == notes[0].name).load()[0], first[0])
  # Held for `hold` of the clip, then released: the tail decays after note-off.
  organ = next(e for e in src.examples('train') if e.labels['family'] == 'organ').load()[0]
  n = len(organ)
  assert np.abs(organ[int(0.6 * n):int(0.74 * n)]).max() > 4 * np.abs(organ[int(0.9 * n):]).max()
  held = soundfont.render(TIMGM6MB, 19, 60, 100, 8000, n, 1.0, 1.0)[0]
  assert np.abs(held[int(0.9 * n):]).max() > 0.5 * np.abs(held[int(0.6 * n):int(0.74 * n)]).max()
  loud = soundfont.render(TIMGM6MB, 19, 60, 127, 8000, n, 0.75, 1.0)[0]
  soft = soundfont.render(TIMGM6MB, 19, 60, 25, 8000, n, 0.75, 1.0)[0]
  assert np.abs(loud).max() > 2 * np.abs(soft).max()


@needs_soundfont
def test_rendered_pitch_is_the_requested_pitch():
  """pyin (the evaluation's estimator) hears the requested MIDI pitch on clear programs."""
  from mars_jax.evaluate import metrics
  notes = [(0, 52), (20, 56), (40, 64), (57, 60), (71, 68), (73, 64), (52, 60), (32, 48)]
  waves = np.stack([soundfont.render(TIMGM6MB, p, k, 100, 8000, 8192, 0.75, 1.0)[0]
                    for p, k in notes])
  r = metrics.pitch_accuracy(waves, 8000, [k for _, k in notes])
  assert r['within_semitone'] == 1.0, r['midi']


@needs_soundfont
@pytest.mark.parametrize('content', [b'', b'not a soundfont at all' * 100, 'riff', 'truncated'])
def test_corrupt_soundfont_is_a_config_error_naming_it(tmp_path, content):
  raw = open(TIMGM6MB, 'rb').read()
  if content == 'riff':      # the right header, garbage after it
    content = b'RIFF' + (4000).to_bytes(4, 'little') + b'sfbk' + os.urandom(4000)
  elif content == 'truncated':
    content = raw[:len(raw) // 3]
  bad = tmp_path / 'broken.sf2'
  bad.write_bytes(content)
  with pytest.raises(ConfigError, match=r'data.path.*broken\.sf2.*(not a SoundFont)'):
    sources.get_source(_config(path=str(bad)))
  with pytest.raises(ConfigError, match=r'data.path.*broken\.sf2'):
    prepare.run(_config(path=str(bad)), str(tmp_path / 'w'), log=quiet)
  assert not os.path.exists(tmp_path / 'w')


@needs_soundfont
def test_missing_soundfont_is_a_config_error_naming_it(tmp_path):
  missing = str(tmp_path / 'nowhere' / 'FluidR3_GM.sf2')
  with pytest.raises(ConfigError, match=r'data.path=.*nowhere/FluidR3_GM\.sf2.*apt-get install'):
    sources.get_source(_config(path=missing))
  with pytest.raises(ConfigError, match='not a file'):
    sources.get_source(_config(path=str(tmp_path)))


@needs_soundfont
def test_prepare_renders_in_workers(tmp_path):
  """Two worker processes (spawned, each opening the SoundFont itself) write records equal to
  the notes rendered here; a program silent at a pitch is skipped and counted."""
  from mars_jax.audio.spectrogram import spectrogram
  # TimGM6mb's baritone sax (67) has no sample at MIDI 84: silent, so skipped.
  c = _config(pitch_range=(83, 84), examples_per_shard=8, prepare_workers=2,
              soundfont__families=('reed', 'organ'))
  work = str(tmp_path / 'w')
  m = prepare.run(c, work, log=quiet)
  assert prepare.is_complete(c, work)
  src = sources.get_source(c)
  listed = {s: len(src.examples(s)) for s in sources.SPLITS}
  assert listed == {s: 2 * len(p) for s, p in _programs(src).items()}
  assert {s: v['listed'] for s, v in m['splits'].items()} == listed
  silent = [k for k in m['skipped'] if k['file'].startswith('reed_acoustic_067-084')]
  assert len(silent) == 1 and silent[0]['reason'].startswith('silent')
  assert m['skipped_counts'].get('silent', 0) == len(m['skipped']) >= 1
  assert sum(v['count'] for v in m['splits'].values()) == sum(listed.values()) - len(m['skipped'])
  assert m['fixed'] == {'resampled': 0, 'downmixed': 0, 'padded': 0, 'cropped': 0}
  assert m['source'] == 'soundfont' and m['vocab']['family'] == ['organ', 'reed']
  assert m['source_info']['sha256'] == src.digest
  assert {v['split'] for v in m['source_info']['programs'].values()} == set(sources.SPLITS)
  with open(os.path.join(work, 'data', 'manifest.json')) as f:
    assert json.load(f) == m
  by_name = {e.name: e for s in sources.SPLITS for e in src.examples(s)}
  for split in sources.SPLITS:
    recs = read_split(work, m, split)
    assert len(recs) == m['splits'][split]['count'] > 0
    for r in recs:
      e = by_name[r['name']]
      assert e.split == split
      assert int(r['pitch']) == e.labels['pitch'] and int(r['velocity']) == e.labels['velocity']
      assert m['vocab']['family'][r['family']] == e.labels['family']
      assert m['vocab']['instrument'][r['instrument']] == e.labels['instrument']
      wave, fixes = audio_io.load_clip(e.load, 8000, 8192)
      assert fixes == []
      np.testing.assert_array_equal(r['spec'], spectrogram(wave, c.spectrogram).astype(np.float16))
  assert prepare.run(c, work, log=quiet) == m    # complete: nothing redone
