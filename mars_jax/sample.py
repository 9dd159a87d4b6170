"""Sound from a trained workdir: one jitted sampler (tokens -> spectrogram) plus Griffin-Lim.

  from mars_jax.sample import Generator, save_wav
  gen = Generator.from_workdir('runs/tiny')
  audio = gen.generate(pitch=60, instrument='brass', n=4, seed=0)   # (4, samples) float32
  save_wav('note.wav', audio[0], gen.sample_rate)
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import griffin_lim
from mars_jax.models import sampling
from mars_jax.models.tokenizer import Tokenizer
from mars_jax.train import partitioning


def save_wav(path, wave, sample_rate):
  """Writes 16-bit PCM, clipping to [-1, 1]; `path` may be local or gs://."""
  fs.write_bytes(path, fs.wav_bytes(np.clip(np.asarray(wave, np.float32), -1.0, 1.0),
                                    sample_rate))


# spectrogram_fn's static arguments, top_k and top_p: they choose the filter's shapes
# (models/sampling.filter_logits). Its compiled program is called without them.
SPEC_STATIC_ARGNUMS = (7, 8)


class Generator:
  """A trained tokenizer + VAR, ready to turn (pitch, instrument) requests into audio.

  Besides the methods, benchmarks and tests read the models and params (`tokenizer`,
  `tokenizer_params`, `var`, `var_params`) and the two jitted programs: `spectrogram_fn`
  (var_params, tokenizer_params, pitch ids, instrument ids, seeds, key, cfg, top_k, top_p) ->
  (spectrograms, tokens), and `audio_fn` (spectrograms -> waveforms, Griffin-Lim).
  """

  def __init__(self, config, manifest, tok_model, tok_params, var_model, var_params):
    self.config = config
    self.shapes = config_lib.derive(config)
    self.sample_rate = int(config.spectrogram.sample_rate)
    self.instruments = list(manifest['vocab'][config.data.instrument_label])
    self.pitches = list(range(self.shapes.pitch_lo, self.shapes.pitch_lo + self.shapes.num_pitches))
    self.tokenizer, self.var = tok_model, var_model
    self.tokenizer_params, self.var_params = tok_params, var_params
    self.spectrogram_fn = jax.jit(self._tokens_to_spectrogram, static_argnums=SPEC_STATIC_ARGNUMS)
    self.audio_fn = jax.jit(functools.partial(griffin_lim.to_audio, spec_cfg=config.spectrogram))

  @classmethod
  def from_workdir(cls, workdir, config=None):
    config = config or workdir_lib.load_config(workdir)
    workdir_lib.check_generator(config, workdir)   # tokenizer, autoregressor, data: one config
    manifest = workdir_lib.load_manifest(workdir)
    # This process's own first device: with several processes each holds a whole copy (the
    # restore is collective, every process reads), so each can sample alone (stages/sample.py).
    mesh = partitioning.make_mesh(_one_device(config), jax.local_devices()[:1])
    tok_params, tok_model = trained.load_tokenizer(config, workdir, mesh)
    n_inst = trained.num_instruments(config, manifest)
    var_params, var_model = trained.load_autoregressor(config, workdir, mesh, n_inst)
    return cls(config, manifest, tok_model, tok_params, var_model, var_params)

  # -- the jitted part -------------------------------------------------------------------------
  def _tokens_to_spectrogram(self, var_params, tok_params, pitch, inst, seeds, key, cfg, top_k,
                             top_p):
    """(B,) requests -> normalised spectrograms (B, F, T) and token maps; one XLA program."""
    def next_input(k, f_hat, tokens_k):
      return self.tokenizer.apply({'params': tok_params}, k, f_hat, tokens_k,
                             method=Tokenizer.next_input)
    tokens, f_hat = sampling.sample_tokens(
        self.var, var_params, pitch, inst, seeds, key, next_input_fn=next_input,
        latent_shape=self.shapes.latent, cfg=cfg, top_k=top_k, top_p=top_p)
    image = self.tokenizer.apply({'params': tok_params}, f_hat, method=Tokenizer.fhat_to_image)
    spec = cmx_lib.from_image(image, self.config.cmx, self.shapes.freq_bins, self.shapes.frames)
    return jnp.clip(spec, -1.0, 1.0), tokens

  # -- the public API ----------------------------------------------------------------------------
  @property
  def batch_size(self) -> int:
    """Notes per jitted call (sample.batch_size): memory stays flat in n, one compile per size."""
    return max(1, int(self.config.sample.get('batch_size', 16) or 1))

  def check(self, pitch, instrument):
    """Maps a MIDI pitch and an instrument name to model ids, or says what is valid."""
    pitch = _midi(pitch)
    if pitch not in self.pitches:
      raise ValueError(f'pitch {pitch} is outside the trained range '
                       f'{self.pitches[0]}..{self.pitches[-1]} (MIDI).')
    if instrument not in self.instruments:
      raise ValueError(f'instrument {instrument!r} is not in the trained vocabulary: '
                       f'{", ".join(self.instruments)}.')
    return pitch - self.shapes.pitch_lo, self.instruments.index(instrument)

  def sampling_args(self, cfg=None, top_k=None, top_p=None):
    """(cfg, top_k, top_p) with the config's defaults filled in, checked, as jit arguments."""
    s = self.config.sample
    cfg = float(s.cfg if cfg is None else cfg)
    top_k = s.top_k if top_k is None else top_k
    top_p = float(s.top_p if top_p is None else top_p)
    if not math.isfinite(cfg):
      raise ValueError(f'cfg={cfg}: the guidance weight must be a finite number (0 = none, '
                       f'e.g. 3.0).')
    if isinstance(top_k, bool) or not float(top_k).is_integer() or top_k < 0:
      raise ValueError(f'top_k={top_k!r}: use a whole number >= 0 (0 = no top-k filter).')
    if not 0.0 <= top_p <= 1.0:   # also False for nan
      raise ValueError(f'top_p={top_p}: use a number in [0, 1] (0 or 1 = no nucleus filter).')
    return jnp.float32(cfg), int(top_k), float(top_p)   # top_k, top_p: static (compile once each)

  def _batches(self, n):
    b = self.batch_size
    return [(start, min(start + b, n)) for start in range(0, n, b)]

  def _spectrogram_batch(self, p_ids, i_ids, seeds, args):
    """One padded batch of at most batch_size requests -> (len, F, T) numpy spectrograms."""
    b, m = self.batch_size, len(p_ids)
    pad = b - m
    pad_to = lambda xs: np.asarray(list(xs) + [xs[-1]] * pad, np.int32)   # repeat the last
    spec, _ = self.spectrogram_fn(self.var_params, self.tokenizer_params,
                                  jnp.asarray(pad_to(p_ids)), jnp.asarray(pad_to(i_ids)),
                                  jnp.asarray(pad_to(seeds)), jax.random.PRNGKey(0), *args)
    return spec[:m]

  def spectrograms(self, pitches, instruments, seeds, cfg=None, top_k=None, top_p=None):
    """Requests (lists of equal length) -> (B, F, T) normalised spectrograms (numpy).

    Sampled in batches of `batch_size` (the last one padded), so a row depends on its own
    request and seed only: the same requests give the same notes however they are batched.
    """
    pitches, instruments, seeds = list(pitches), list(instruments), list(seeds)
    if not len(pitches) == len(instruments) == len(seeds):
      raise ValueError(f'pitches, instruments and seeds must have one entry a note '
                       f'(got {len(pitches)}, {len(instruments)}, {len(seeds)}).')
    args = self.sampling_args(cfg, top_k, top_p)
    ids = [self.check(p, i) for p, i in zip(pitches, instruments)]
    seeds = [_seed(x) for x in seeds]
    out = np.zeros((len(ids), self.shapes.freq_bins, self.shapes.frames), np.float32)
    for a, z in self._batches(len(ids)):
      out[a:z] = np.asarray(self._spectrogram_batch([p for p, _ in ids[a:z]],
                                                    [q for _, q in ids[a:z]], seeds[a:z], args))
    return out

  def audio(self, spec):
    """(B, F, T) normalised spectrograms -> (B, samples) waveforms (Griffin-Lim in JAX), in
    batches of `batch_size` (the last one padded)."""
    spec = np.asarray(spec, np.float32)
    out = np.zeros((len(spec), self.shapes.n_samples), np.float32)
    b = self.batch_size
    for a, z in self._batches(len(spec)):
      chunk = spec[a:z]
      if len(chunk) < b:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), 0)])
      out[a:z] = np.asarray(self.audio_fn(jnp.asarray(chunk)))[:z - a]
    return out

  def generate(self, pitch=60, instrument=None, n=1, seed=0, cfg=None, top_k=None, top_p=None):
    """n notes of one pitch and instrument -> (n, samples) float32; sample i uses seed + i.

    Notes are made batch_size at a time (tokens, spectrogram and audio of one batch before the
    next), so memory does not grow with n beyond the returned waveforms.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f'n={n!r}: the number of notes must be a whole number >= 0.')
    instrument = self.instruments[0] if instrument is None else instrument
    args = self.sampling_args(cfg, top_k, top_p)
    p_id, i_id = self.check(pitch, instrument)
    seed = _seed(seed)
    _seed(seed + max(int(n) - 1, 0))
    out = np.zeros((int(n), self.shapes.n_samples), np.float32)
    for a, z in self._batches(int(n)):
      spec = self._spectrogram_batch([p_id] * (z - a), [i_id] * (z - a),
                                     [seed + i for i in range(a, z)], args)
      out[a:z] = self.audio(spec)
    return out


def _midi(pitch) -> int:
  """A whole MIDI number (60, 60.0, np.int32(60)); 60.7 or 'C4' is an error, not truncated."""
  if isinstance(pitch, (bool, np.bool_)) or not isinstance(pitch, (int, float, np.integer,
                                                                     np.floating)):
    raise ValueError(f'pitch={pitch!r}: give a MIDI note number, a whole number such as 60.')
  if not (math.isfinite(pitch) and float(pitch).is_integer()):
    raise ValueError(f'pitch={pitch!r}: give a whole MIDI note number such as 60 '
                     f'(not a fraction).')
  return int(pitch)


def _seed(seed) -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f'seed={seed!r}: use a whole number in 0..{2**31 - 1}.')
  if not 0 <= int(seed) < 2**31:
    raise ValueError(f'seed={seed}: use a whole number in 0..{2**31 - 1}.')
  return int(seed)


def _one_device(config):
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  return c
