"""Built-in NSynth-like notes, so the whole pipeline runs without downloading anything.

Each family has its own timbre recipe (harmonic profile, envelope, inharmonicity,
breath noise, vibrato, formants) so the instrument label is learnable from the
spectrogram; each family has a few instruments, small fixed variations of its recipe.
A note is a pure function of (pitch, family, instrument, velocity, rng), vectorised
over harmonics and time, so the tiny config prepares in seconds.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

# NSynth's family list (instrument_family_str); the synthetic set uses a subset.
NSYNTH_FAMILIES = ('bass', 'brass', 'flute', 'guitar', 'keyboard', 'mallet', 'organ',
                   'reed', 'string', 'synth_lead', 'vocal')
VELOCITIES = (25, 50, 75, 100, 127)   # NSynth's velocity levels
INSTRUMENTS_PER_FAMILY = 3
NOTE_OFF = 0.75                       # NSynth holds the key for 3 s of 4 s
MAX_PARTIALS = 40


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Timbre parameters of one family (instrument variations perturb them)."""
  slope: float = 1.5          # partial k has amplitude k**-slope
  even: float = 1.0           # gain of even harmonics (low: clarinet-like)
  attack: float = 0.01        # seconds
  decay: float = 0.5          # seconds, time constant towards sustain
  sustain: float = 0.0        # level after decay
  release: float = 0.1        # seconds after note-off
  damping: float = 0.0        # extra decay per partial index (1/s): bright attack, dull tail
  inharm: float = 0.0         # stiff-string B: f_k = k f0 sqrt(1 + B k^2)
  ratios: tuple = ()          # explicit partial ratios (mallets) instead of k
  noise: float = 0.0          # breath / bow noise level relative to the tone
  vib_rate: float = 0.0       # Hz
  vib_depth: float = 0.0      # relative frequency deviation
  formants: tuple = ()        # (centre Hz, bandwidth Hz) spectral peaks
  detune: float = 0.0         # relative detune of a second oscillator (synth)


RECIPES = {
    'bass': Recipe(slope=2.4, attack=0.005, decay=0.9, sustain=0.05, release=0.08, damping=1.5,
                   inharm=2e-5),
    'brass': Recipe(slope=0.9, attack=0.06, decay=0.3, sustain=0.8, release=0.12,
                    formants=((1200.0, 900.0),), noise=0.01),
    'flute': Recipe(slope=3.0, even=0.6, attack=0.08, decay=0.4, sustain=0.9, release=0.15,
                    noise=0.25, vib_rate=4.5, vib_depth=0.003),
    'guitar': Recipe(slope=1.2, attack=0.002, decay=0.7, sustain=0.0, release=0.05, damping=3.0,
                     inharm=1.5e-4),
    'keyboard': Recipe(slope=1.7, attack=0.003, decay=1.2, sustain=0.0, release=0.2, damping=1.2,
                       inharm=4e-4),
    'mallet': Recipe(slope=0.8, attack=0.001, decay=0.35, sustain=0.0, release=0.05, damping=4.0,
                     ratios=(1.0, 3.93, 9.54, 16.7, 25.8)),
    'organ': Recipe(slope=0.4, attack=0.02, decay=1.0, sustain=1.0, release=0.03,
                    ratios=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)),
    'reed': Recipe(slope=0.8, even=0.15, attack=0.04, decay=0.3, sustain=0.85, release=0.08,
                   noise=0.06, formants=((1500.0, 700.0),)),
    'string': Recipe(slope=1.0, attack=0.18, decay=0.5, sustain=0.9, release=0.25, noise=0.03,
                     vib_rate=5.5, vib_depth=0.005),
    'synth_lead': Recipe(slope=1.0, attack=0.01, decay=0.2, sustain=0.95, release=0.05,
                         detune=0.004),
    'vocal': Recipe(slope=1.6, attack=0.1, decay=0.4, sustain=0.85, release=0.2, noise=0.04,
                    vib_rate=5.0, vib_depth=0.008,
                    formants=((700.0, 130.0), (1220.0, 150.0), (2600.0, 250.0))),
}


def instrument_names(family: str, n: int = INSTRUMENTS_PER_FAMILY):
  """NSynth-style instrument names, e.g. 'brass_synthetic_001'."""
  return [f'{family}_synthetic_{i:03d}' for i in range(n)]


def instrument_recipe(family: str, instrument: int) -> Recipe:
  """The family recipe, perturbed deterministically per instrument (0 = the family's own)."""
  if family not in RECIPES:
    raise ValueError(f'unknown synthetic family {family!r}; choose from {sorted(RECIPES)}')
  base = RECIPES[family]
  if instrument == 0:
    return base
  r = np.random.default_rng(zlib.crc32(f'{family}/{instrument}'.encode()))
  u = lambda lo, hi: float(r.uniform(lo, hi))  # noqa: E731
  return dataclasses.replace(
      base,
      slope=max(0.2, base.slope + u(-0.35, 0.35)),
      decay=base.decay * u(0.7, 1.4),
      damping=base.damping * u(0.6, 1.5),
      inharm=base.inharm * u(0.5, 2.0),
      noise=base.noise * u(0.6, 1.5),
      vib_rate=base.vib_rate + u(-0.6, 0.6) if base.vib_rate else 0.0,
      formants=tuple((f * u(0.88, 1.12), b) for f, b in base.formants),
      ratios=tuple(x * (1.0 + u(-0.02, 0.02)) if i else x for i, x in enumerate(base.ratios)),
  )


def midi_hz(pitch):
  return 440.0 * 2.0 ** ((pitch - 69) / 12.0)


def _sines(freqs, tt, phase0):
  """(K, N) float32 sin(2 pi (f_k t + phase0_k)): cycles wrapped in float64, sin in float32
  (several times faster than a float64 sin, and exact enough after wrapping)."""
  cyc = np.outer(freqs, tt)
  cyc += phase0[:, None]
  cyc -= np.floor(cyc)
  return np.sin((2.0 * math.pi) * cyc.astype(np.float32))


def synth_note(pitch: int, family: str, velocity: int, sample_rate: int, n_samples: int,
               rng: np.random.Generator, instrument: int = 0) -> np.ndarray:
  """One note as float32 (n_samples,), peak in (0, 1) growing with velocity."""
  rc = instrument_recipe(family, instrument)
  f0 = midi_hz(pitch) * (1.0 + rng.uniform(-0.001, 0.001))
  t = np.arange(n_samples, dtype=np.float64) / sample_rate
  vel = velocity / 127.0
  if rc.ratios:
    k = np.asarray(rc.ratios, np.float64)
  else:
    k = np.arange(1, MAX_PARTIALS + 1, dtype=np.float64)
  freqs = k * f0 * np.sqrt(1.0 + rc.inharm * k ** 2)
  keep = freqs < 0.45 * sample_rate
  k, freqs = k[keep], freqs[keep]
  if k.size == 0:  # pitch above the band: keep the fundamental so the note is not silent
    k, freqs = np.ones(1), np.array([min(f0, 0.45 * sample_rate)])
  # Harmonic profile: power-law roll-off (brighter when louder), odd/even balance, formants.
  amps = k ** -(rc.slope - 0.4 * (vel - 0.5))
  whole = np.abs(k - np.round(k)) < 1e-6
  amps = amps * np.where(whole & (np.round(k) % 2 == 0), rc.even, 1.0)
  if rc.formants:
    g = sum(np.exp(-0.5 * ((freqs - fc) / bw) ** 2) for fc, bw in rc.formants)
    amps = amps * (0.08 + g)
  amps = amps * (1.0 + 0.1 * rng.standard_normal(k.size)).clip(0.5, 1.5)
  # Envelope: attack ramp, decay to sustain, release after note-off; partials damp with index.
  off = NOTE_OFF * n_samples / sample_rate
  env = np.clip(t / max(rc.attack, 1e-4), 0.0, 1.0)
  env = env * (rc.sustain + (1.0 - rc.sustain) * np.exp(-t / rc.decay))
  env = env * np.where(t < off, 1.0, np.exp(-(np.maximum(t - off, 0.0)) / rc.release))
  # Vibrato (delayed onset) as phase modulation of the time axis: f(t) = f (1 + d sin(2 pi v t)).
  if rc.vib_rate:
    depth = rc.vib_depth * np.clip(t / 0.3, 0.0, 1.0)
    w = 2.0 * math.pi * rc.vib_rate
    tt = t + depth * (1.0 - np.cos(w * t)) / w
  else:
    tt = t
  phase0 = rng.uniform(0.0, 1.0, k.size)
  parts = _sines(freqs, tt, phase0)
  if rc.damping:
    parts *= np.exp(np.outer(-rc.damping * (k - 1.0) / 4.0, t).astype(np.float32))
  tone = (amps.astype(np.float32) @ parts).astype(np.float64)
  if rc.detune:
    tone = tone + amps.astype(np.float32) @ _sines(freqs * (1 + rc.detune), tt, phase0)
  wave = tone * env
  if rc.noise:
    # Breath noise: white noise shaped around the low harmonics, loudest at the onset.
    spec = np.fft.rfft(rng.standard_normal(n_samples))
    fgrid = np.fft.rfftfreq(n_samples, 1.0 / sample_rate)
    spec *= np.exp(-0.5 * ((fgrid - 2.0 * f0) / (1.5 * f0 + 300.0)) ** 2)
    noise = np.fft.irfft(spec, n_samples)
    noise *= rc.noise * np.abs(tone).max() / (np.abs(noise).max() + 1e-9)
    wave = wave + noise * (env + 1.5 * np.exp(-t / 0.05) * (t < off))
  peak = np.abs(wave).max()
  gain = 0.1 + 0.8 * vel
  return (wave * (gain / peak if peak > 0 else 0.0)).astype(np.float32)


def note_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
  """The generator for one note: depends only on (seed, split, index)."""
  return np.random.default_rng([int(seed), int(split_id), int(index)])


def render(seed: int, split_id: int, index: int, pitch: int, family: str, velocity: int,
           instrument: int, sample_rate: int, n_samples: int):
  """Picklable loader body: (wave, sample_rate) for one listed synthetic note."""
  rng = note_rng(seed, split_id, index)
  return synth_note(pitch, family, velocity, sample_rate, n_samples, rng, instrument), sample_rate
