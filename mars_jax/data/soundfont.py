"""NSynth-format notes rendered from a General MIDI SoundFont (.sf2/.sf3): real sampled
instruments without downloading a data set.

Every note is one General MIDI program (bank 0) at one pitch and velocity: the key is held
for `data.soundfont.hold` of `spectrogram.duration`, then released, so the release tail is in
the clip (NSynth: 3 s held + 1 s release in 4 s). The GM programs are mapped to NSynth's
instrument families (PROGRAMS); an instrument is one program, named NSynth-style
`<family>_<source>_<program>` (e.g. 'guitar_acoustic_024'), and the split is by program
(held-out instruments, as NSynth splits by instrument), chosen per family from `seed`.

Rendering uses FluidSynth (the reference SoundFont synthesiser) through the `pyfluidsynth`
binding (`pip install 'mars_jax[soundfont]'` plus the system library: `apt-get install
libfluidsynth3`, or `brew install fluid-synth`). Each process loads the SoundFont once, lazily,
and every note is rendered by a fresh synthesiser sharing that loaded SoundFont: a reused
synthesiser carries state from the previous note (its voices' amplitude ramps and filter
histories), so the audio would depend on which notes a worker rendered before. A fresh one
makes a note a pure function of its arguments: bit-identical in any process, any order.
Notes are rendered at the first whole multiple of the sample rate >= 44.1 kHz (FluidSynth
does not band-limit pitch-shifted samples, so rendering at 8 kHz would alias) and resampled
with soxr, as every other source's audio is.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import json
import os

import numpy as np

from mars_jax import config as config_lib
from mars_jax.config import ConfigError
from mars_jax.data import audio_io, synthetic
from mars_jax.data.examples import Example, Source, hash_fraction

# GM program -> NSynth family and instrument source, for the pitched melodic programs whose
# timbre NSynth has a family for. Pads (88-95, but the choir pad 91 is a voice), effects
# (96-103, 120-127), percussion (112-119) and the orchestra hit (55) are left out; ethnic
# instruments join the nearest family (sitar, banjo, shamisen: guitar; koto, fiddle: string;
# kalimba: mallet; bagpipe, shanai: reed). Also left out: programs whose sounding pitch is not
# the key's, so that pitch labels (and pyin, which evaluation scores pitch with) agree. pyin on
# TimGM6mb, MIDI 48-68 at 8 kHz, heard another pitch on every note of the drawbar, percussive and
# rock organs (16-18: their 16' drawbar sounds an octave below the key), guitar harmonics (31:
# an octave or two above), timpani (47: an octave below), the fifths lead (86) and TimGM6mb's
# whistle (78: 9 semitones flat), and on 5 of 6 of the glockenspiel (9, inharmonic). With
# them out, pyin hears the labelled pitch (within a semitone) on 95% of that grid.
_A, _E, _S = 'acoustic', 'electronic', 'synthetic'
PROGRAMS = {
    'bass': {32: _A, 33: _E, 34: _E, 35: _E, 36: _E, 37: _E, 38: _S, 39: _S},
    'brass': {56: _A, 57: _A, 58: _A, 59: _A, 60: _A, 61: _A, 62: _S, 63: _S},
    'flute': {72: _A, 73: _A, 74: _A, 75: _A, 76: _A, 77: _A, 79: _A},
    'guitar': {24: _A, 25: _A, 26: _E, 27: _E, 28: _E, 29: _E, 30: _E, 104: _A, 105: _A,
               106: _A},
    'keyboard': {0: _A, 1: _A, 2: _E, 3: _A, 4: _E, 5: _E, 6: _A, 7: _E},
    'mallet': {8: _A, 10: _A, 11: _A, 12: _A, 13: _A, 14: _A, 15: _A, 108: _A},
    'organ': {19: _A, 20: _A, 21: _A, 23: _A},
    'reed': {22: _A, 64: _A, 65: _A, 66: _A, 67: _A, 68: _A, 69: _A, 70: _A, 71: _A, 109: _A,
             111: _A},
    'string': {40: _A, 41: _A, 42: _A, 43: _A, 44: _A, 45: _A, 46: _A, 48: _A, 49: _A, 50: _S,
               51: _S, 107: _A, 110: _A},
    'synth_lead': {80: _S, 81: _S, 82: _S, 83: _S, 84: _S, 85: _S, 87: _S},
    'vocal': {52: _A, 53: _A, 54: _S, 91: _S},
}
assert tuple(PROGRAMS) == synthetic.NSYNTH_FAMILIES

# Tried in order when data.path is empty: Debian/Ubuntu's default GM font (an alternatives
# link to the best installed one), the packaged fonts by name, other distributions' places.
SEARCH = ('/usr/share/sounds/sf2/default-GM.sf2', '/usr/share/sounds/sf2/FluidR3_GM.sf2',
          '/usr/share/sounds/sf2/TimGM6mb.sf2', '/usr/share/sounds/sf3/default-GM.sf3',
          '/usr/share/sounds/sf3/MuseScore_General.sf3', '/usr/share/soundfonts/default.sf2',
          '/usr/share/soundfonts/FluidR3_GM.sf2', '/usr/share/sounds/sf2/*.sf2',
          '/usr/share/soundfonts/*.sf2', '/usr/local/share/soundfonts/*.sf2',
          '/opt/homebrew/share/soundfonts/*.sf2')
INSTALL = ("install a General MIDI SoundFont (Debian/Ubuntu: 'apt-get install timgm6mb-soundfont'"
           " (6 MB) or 'apt-get install fluid-soundfont-gm' (FluidR3_GM, 140 MB, better sound)),"
           " or pass --config.data.path=FILE.sf2")
BINDING = ("data.source='soundfont' renders with FluidSynth: pip install 'mars_jax[soundfont]' "
           "(the pyfluidsynth binding) and the FluidSynth library (Debian/Ubuntu: "
           "'apt-get install libfluidsynth3'; macOS: 'brew install fluid-synth')")
MIN_RENDER_RATE = 44100
_LOG_LEVELS = {0: 'panic', 1: 'error', 2: 'warning', 3: 'info', 4: 'debug'}


def instrument_name(family: str, program: int) -> str:
  """NSynth's instrument_str for a GM program, e.g. 'guitar_acoustic_024'."""
  return f'{family}_{PROGRAMS[family][program]}_{program:03d}'


def render_rate(sample_rate: int) -> int:
  """The rate notes are rendered at: sample_rate's first whole multiple >= 44.1 kHz."""
  sr = int(sample_rate)
  return sr * -(-MIN_RENDER_RATE // sr) if sr < MIN_RENDER_RATE else sr


# --- the FluidSynth binding, loaded once per process ------------------------------------------

_lib = None
_messages = []     # FluidSynth's error messages since the last _take_messages()


def _take_messages():
  out = list(_messages)
  _messages.clear()
  return out


def library():
  """(pyfluidsynth module, a namespace of the C functions used here). Raises ImportError."""
  global _lib
  if _lib is not None:
    return _lib
  import fluidsynth as fl   # raises ImportError when the binding or the library is absent
  c = ctypes
  # The library the binding found and loaded; the few calls it does not wrap (sharing a loaded
  # SoundFont between synthesisers, float output) are declared here on the same handle.
  handle = getattr(fl, '_fl', None) or ctypes.CDLL(fl.lib)

  def fn(name, res, *args):
    f = getattr(handle, name)
    f.restype, f.argtypes = res, list(args)
    return f

  api = type('FluidSynthAPI', (), {})()
  api.new_settings = fn('new_fluid_settings', c.c_void_p)
  api.setnum = fn('fluid_settings_setnum', c.c_int, c.c_void_p, c.c_char_p, c.c_double)
  api.setint = fn('fluid_settings_setint', c.c_int, c.c_void_p, c.c_char_p, c.c_int)
  api.new_synth = fn('new_fluid_synth', c.c_void_p, c.c_void_p)
  api.delete_synth = fn('delete_fluid_synth', None, c.c_void_p)
  api.sfload = fn('fluid_synth_sfload', c.c_int, c.c_void_p, c.c_char_p, c.c_int)
  api.get_sfont = fn('fluid_synth_get_sfont_by_id', c.c_void_p, c.c_void_p, c.c_int)
  api.add_sfont = fn('fluid_synth_add_sfont', c.c_int, c.c_void_p, c.c_void_p)
  api.remove_sfont = fn('fluid_synth_remove_sfont', c.c_int, c.c_void_p, c.c_void_p)
  api.get_preset = fn('fluid_sfont_get_preset', c.c_void_p, c.c_void_p, c.c_int, c.c_int)
  api.preset_name = fn('fluid_preset_get_name', c.c_char_p, c.c_void_p)
  api.program_select = fn('fluid_synth_program_select', c.c_int, c.c_void_p, c.c_int, c.c_int,
                          c.c_int, c.c_int)
  api.noteon = fn('fluid_synth_noteon', c.c_int, c.c_void_p, c.c_int, c.c_int, c.c_int)
  api.noteoff = fn('fluid_synth_noteoff', c.c_int, c.c_void_p, c.c_int, c.c_int)
  api.write_float = fn('fluid_synth_write_float', c.c_int, c.c_void_p, c.c_int, c.c_void_p,
                       c.c_int, c.c_int, c.c_void_p, c.c_int, c.c_int)
  version = fn('fluid_version_str', c.c_char_p)
  api.version = version().decode()
  # FluidSynth logs to stderr; keep errors (they explain a failed load), drop the rest (a fresh
  # synthesiser warns once per MIDI channel that it has no preset yet).
  log_fn = c.CFUNCTYPE(None, c.c_int, c.c_char_p, c.c_void_p)
  api.on_log = log_fn(lambda level, msg, _: _messages.append(
      f'{_LOG_LEVELS.get(level, level)}: {msg.decode(errors="replace")}') if level <= 1 else None)
  set_log = fn('fluid_set_log_function', c.c_void_p, c.c_int, log_fn, c.c_void_p)
  for level in _LOG_LEVELS:
    set_log(level, api.on_log, None)
  _lib = (fl, api)
  return _lib


class _Loaded:
  """A SoundFont loaded into one process, shared by the per-note synthesisers."""

  def __init__(self, path, gain, rate):
    _, api = library()
    self.api = api
    self.settings = api.new_settings()
    s = self.settings
    api.setnum(s, b'synth.sample-rate', float(rate))
    api.setnum(s, b'synth.gain', float(gain))
    api.setint(s, b'synth.reverb.active', 0)     # dry notes, as NSynth's
    api.setint(s, b'synth.chorus.active', 0)
    api.setint(s, b'synth.cpu-cores', 1)
    api.setint(s, b'synth.midi-channels', 16)
    api.setint(s, b'synth.polyphony', 64)
    self.owner = api.new_synth(s)
    _take_messages()
    sfid = api.sfload(self.owner, os.fsencode(path), 0)
    if sfid < 0:
      why = '; '.join(_take_messages()) or 'FluidSynth could not load it'
      api.delete_synth(self.owner)
      raise ValueError(f'{path!r} is not a SoundFont FluidSynth can read ({why})')
    self.sfont = api.get_sfont(self.owner, sfid)

  def preset(self, program):
    """The bank-0 preset name of `program`, or None where the SoundFont has none."""
    p = self.api.get_preset(self.sfont, 0, int(program))
    return self.api.preset_name(p).decode('latin-1').strip() if p else None

  def render(self, program, pitch, velocity, n, n_on):
    """Stereo-averaged float32 (n,): key on for n_on samples, off for the rest."""
    api = self.api
    synth = api.new_synth(self.settings)
    try:
      sfid = api.add_sfont(synth, self.sfont)
      try:
        if api.program_select(synth, 0, sfid, 0, int(program)) != 0:
          raise audio_io.BadAudio(f'unreadable: no bank 0 preset for program {program}')
        left, right = np.zeros(n, np.float32), np.zeros(n, np.float32)
        api.noteon(synth, 0, int(pitch), int(velocity))
        if n_on:
          api.write_float(synth, n_on, left.ctypes.data, 0, 1, right.ctypes.data, 0, 1)
        api.noteoff(synth, 0, int(pitch))
        if n > n_on:
          api.write_float(synth, n - n_on, left[n_on:].ctypes.data, 0, 1,
                          right[n_on:].ctypes.data, 0, 1)
      finally:
        api.remove_sfont(synth, self.sfont)
    finally:
      api.delete_synth(synth)
    return 0.5 * (left + right)


@functools.lru_cache(maxsize=4)
def _loaded(path, gain, rate) -> _Loaded:
  return _Loaded(path, gain, rate)


def render(path: str, program: int, pitch: int, velocity: int, sample_rate: int, n_samples: int,
           hold: float, gain: float):
  """Picklable loader body: (wave float32 (n_samples,), sample_rate) for one note.

  The SoundFont is opened on the first call in a process and kept."""
  rate = render_rate(sample_rate)
  n = int(np.ceil(n_samples * rate / sample_rate))
  n_on = min(n, int(round(hold * n)))
  wave = _loaded(path, float(gain), rate).render(program, pitch, velocity, n, n_on)
  if rate != sample_rate:
    wave = audio_io.resample(wave, rate, sample_rate)
  return wave[:n_samples], int(sample_rate)


# --- finding and checking the file ------------------------------------------------------------

def find_soundfont(path: str = '') -> str:
  """data.path, or the first SoundFont in SEARCH; ConfigError saying what to install if none."""
  if path:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
      raise ConfigError(f'data.path={path!r}: no such SoundFont file ({full}); {INSTALL}.')
    if not os.path.isfile(full):
      raise ConfigError(f'data.path={path!r}: {full} is not a file; data.source=\'soundfont\' '
                        f'needs the .sf2/.sf3 file itself.')
    return full
  for pattern in SEARCH:
    for p in sorted(glob.glob(pattern)):
      if os.path.isfile(p):
        return os.path.realpath(p)
  raise ConfigError(f"data.path is empty and no SoundFont is installed in the standard places "
                    f"({', '.join(SEARCH[:3])}, ...): {INSTALL}.")


def _digest(path):
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def check_soundfont(path: str, what: str = 'data.path') -> None:
  """Raises ConfigError naming `path` unless it starts like a SoundFont (RIFF .. sfbk)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(12)
  except OSError as e:
    raise ConfigError(f'{what}: cannot read SoundFont {path!r} ({e}).') from e
  if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'sfbk':
    raise ConfigError(f'{what}: {path!r} is not a SoundFont (a .sf2/.sf3 file starts with '
                      f'RIFF....sfbk; this one starts with {head[:12]!r}); {INSTALL}.')


# --- the source ----------------------------------------------------------------------------------

def _held_out_counts(n, valid_fraction, test_fraction):
  """(n_valid, n_test) programs of a family of n: rounded fractions, at least one each where
  the fraction is positive and the family has 3 or more, never the last training program."""
  def count(f):
    k = int(round(n * f))
    return max(k, 1) if f > 0 and n >= 3 else k
  nv, nt = count(valid_fraction), count(test_fraction)
  while nv + nt >= n and nv + nt > 0:
    if nt >= nv:
      nt -= 1
    else:
      nv -= 1
  return nv, nt


def assign_programs(config, available=None):
  """{program: (family, split)} for the configured families: per family, the programs in a
  seeded order; the first programs_per_family kept (0: all), the first of those to test, the
  next to valid, the rest to train. Deterministic from `seed`; no program in two splits."""
  s = config.data.soundfont
  seed = int(config.seed)
  out = {}
  for family in s.families:
    progs = [p for p in PROGRAMS[family] if available is None or p in available]
    progs.sort(key=lambda p: hash_fraction(f'soundfont/{seed}/{p:03d}'))
    if int(s.programs_per_family):
      progs = progs[:int(s.programs_per_family)]
    nv, nt = _held_out_counts(len(progs), float(s.valid_fraction), float(s.test_fraction))
    for i, p in enumerate(progs):
      out[p] = (family, 'test' if i < nt else 'valid' if i < nt + nv else 'train')
  return out


def velocities_for(config, program, pitch):
  """The velocities one (program, pitch) is rendered at: data.velocities (() = NSynth's five),
  notes_per_pitch of them (0 = all), chosen from (seed, program, pitch); ascending."""
  vels = tuple(int(v) for v in config.data.velocities) or synthetic.VELOCITIES
  k = int(config.data.soundfont.notes_per_pitch)
  if not k or k >= len(vels):
    return sorted(vels)
  seed = int(config.seed)
  order = sorted(vels, key=lambda v: hash_fraction(
      f'soundfont-velocity/{seed}/{program:03d}/{pitch:03d}/{v:03d}'))
  return sorted(order[:k])


class SoundFontSource(Source):
  """GM programs of a SoundFont x pitch_range x velocities, split by program."""

  name = 'soundfont'

  def __init__(self, config):
    super().__init__(config)
    config_lib.validate_soundfont(config)
    try:
      _, api = library()
    except (ImportError, OSError, AttributeError) as e:
      raise ConfigError(f'{BINDING}. ({type(e).__name__}: {e})') from e
    self.path = find_soundfont(config.data.path)
    check_soundfont(self.path)
    self.rate = render_rate(config.spectrogram.sample_rate)
    try:
      loaded = _loaded(self.path, float(config.data.soundfont.gain), self.rate)
    except ValueError as e:
      raise ConfigError(f'data.path: {e}; {INSTALL}.') from e
    self.presets = {p: loaded.preset(p) for fam in PROGRAMS.values() for p in fam}
    self.missing = sorted(p for p, name in self.presets.items() if name is None)
    self.programs = assign_programs(config, {p for p, n in self.presets.items() if n})
    if not self.programs:
      raise ConfigError(f'data.path: the SoundFont {self.path!r} has no bank 0 (General MIDI) '
                        f'preset for the programs of data.soundfont.families='
                        f'{tuple(config.data.soundfont.families)}; use a General MIDI SoundFont.')
    self.digest = _digest(self.path)
    self.version = api.version

  def info(self) -> dict:
    """What the manifest records about the rendered set."""
    return {'soundfont': self.path, 'sha256': self.digest, 'fluidsynth': self.version,
            'render_rate': self.rate,
            'programs': {instrument_name(f, p): {'program': p, 'preset': self.presets[p],
                                                 'family': f, 'split': s}
                         for p, (f, s) in sorted(self.programs.items())},
            'missing_programs': self.missing}

  def vocab_labels(self):
    """Every selected family and instrument, whatever max_files or the pitch range keep."""
    return ({f for f, _ in self.programs.values()},
            {instrument_name(f, p) for p, (f, _) in self.programs.items()})

  def _list(self, split):
    cfg = self.config
    s = cfg.data.soundfont
    lo, hi = (int(v) for v in cfg.data.pitch_range)
    sr = int(cfg.spectrogram.sample_rate)
    n_samples = int(round(sr * cfg.spectrogram.duration))
    hold, gain = float(s.hold), float(s.gain)
    out = []
    for program, (family, where) in sorted(self.programs.items()):
      if where != split:
        continue
      inst = instrument_name(family, program)
      for pitch in range(lo, hi + 1):
        for velocity in velocities_for(cfg, program, pitch):
          args = (self.path, program, pitch, velocity, sr, n_samples, hold, gain)
          out.append(Example(
              name=f'{inst}-{pitch:03d}-{velocity:03d}', split=split,
              labels={'pitch': pitch, 'velocity': velocity, 'family': family,
                      'instrument': inst},
              load=functools.partial(render, *args),
              key='soundfont' + json.dumps([self.digest, self.version, *args[1:]])))
    skipped = []
    if split == 'train':   # GM programs of the configured families that this SoundFont lacks
      for program in self.missing:
        family = next(f for f, progs in PROGRAMS.items() if program in progs)
        if family in tuple(s.families):
          skipped.append({'file': f'{instrument_name(family, program)} (GM program {program})',
                          'split': split,
                          'reason': f'unreadable: no bank 0 preset in {self.path}'})
    return out, skipped, 0

