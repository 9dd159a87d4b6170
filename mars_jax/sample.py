"""Sound from a trained workdir: one jitted sampler (tokens -> spectrogram) plus Griffin-Lim.

  from mars_jax.sample import Generator, save_wav
  gen = Generator.from_workdir('runs/tiny')
  audio = gen.generate(pitch=60, instrument='brass', n=4, seed=0)   # (4, samples) float32
  save_wav('note.wav', audio[0], gen.sample_rate)
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import griffin_lim
from mars_jax.data import pipeline
from mars_jax.models import sampling
from mars_jax.models.tokenizer import Tokenizer
from mars_jax.stages import autoregressor as ar_stage
from mars_jax.stages import common
from mars_jax.stages import tokenizer as tok_stage
from mars_jax.train import partitioning


def load_config(workdir):
  """The config a workdir was made with (written by the CLI as config.json)."""
  path = fs.join(workdir, 'config.json')
  if not fs.exists(path):
    raise FileNotFoundError(f'{path} is missing: is {workdir} a mars_jax workdir? '
                            f'Pass config= explicitly otherwise.')
  return ml_collections.ConfigDict(json.loads(fs.read_text(path)))


def save_wav(path, wave, sample_rate):
  """Writes 16-bit PCM, clipping to [-1, 1]; `path` may be local or gs://."""
  fs.write_bytes(path, fs.wav_bytes(np.clip(np.asarray(wave, np.float32), -1.0, 1.0),
                                    sample_rate))


class Generator:
  """A trained tokenizer + VAR, ready to turn (pitch, instrument) requests into audio."""

  def __init__(self, config, manifest, tok_model, tok_params, var_model, var_params):
    self.config = config
    self.shapes = config_lib.derive(config)
    self.sample_rate = int(config.spectrogram.sample_rate)
    self.instruments = list(manifest['vocab'][config.data.instrument_label])
    self.pitches = list(range(self.shapes.pitch_lo, self.shapes.pitch_lo + self.shapes.num_pitches))
    self._tok, self._var = tok_model, var_model
    self._tok_params, self._var_params = tok_params, var_params
    # top_k / top_p are static: they choose the filter's shapes (models/sampling.filter_logits).
    self._spec_fn = jax.jit(self._tokens_to_spectrogram, static_argnums=(7, 8))
    self._audio_fn = jax.jit(functools.partial(griffin_lim.to_audio, spec_cfg=config.spectrogram))

  @classmethod
  def from_workdir(cls, workdir, config=None):
    config = config or load_config(workdir)
    manifest = pipeline.load_manifest(common.data_dir(workdir))
    mesh = partitioning.make_mesh(_one_device(config), jax.devices()[:1])
    tok_params, tok_model = tok_stage.load_params(config, workdir, mesh)
    n_inst = ar_stage.num_instruments(config, manifest)
    var_params, var_model = ar_stage.load_params(config, workdir, mesh, n_inst)
    return cls(config, manifest, tok_model, tok_params, var_model, var_params)

  # -- the jitted part -------------------------------------------------------------------------
  def _tokens_to_spectrogram(self, var_params, tok_params, pitch, inst, seeds, key, cfg, top_k,
                             top_p):
    """(B,) requests -> normalised spectrograms (B, F, T) and token maps; one XLA program."""
    def next_input(k, f_hat, tokens_k):
      return self._tok.apply({'params': tok_params}, k, f_hat, tokens_k,
                             method=Tokenizer.next_input)
    tokens, f_hat = sampling.sample_tokens(
        self._var, var_params, pitch, inst, seeds, key, next_input_fn=next_input,
        latent_shape=self.shapes.latent, cfg=cfg, top_k=top_k, top_p=top_p)
    image = self._tok.apply({'params': tok_params}, f_hat, method=Tokenizer.fhat_to_image)
    spec = cmx_lib.from_image(image, self.config.cmx, self.shapes.freq_bins, self.shapes.frames)
    return jnp.clip(spec, -1.0, 1.0), tokens

  # -- the public API ----------------------------------------------------------------------------
  def check(self, pitch, instrument):
    """Maps a MIDI pitch and an instrument name to model ids, or says what is valid."""
    if pitch not in self.pitches:
      raise ValueError(f'pitch {pitch} is outside the trained range '
                       f'{self.pitches[0]}..{self.pitches[-1]} (MIDI).')
    if instrument not in self.instruments:
      raise ValueError(f'instrument {instrument!r} is not in the trained vocabulary: '
                       f'{", ".join(self.instruments)}.')
    return pitch - self.shapes.pitch_lo, self.instruments.index(instrument)

  def spectrograms(self, pitches, instruments, seeds, cfg=None, top_k=None, top_p=None):
    """Requests (lists of equal length) -> (B, F, T) normalised spectrograms (numpy)."""
    s = self.config.sample
    ids = [self.check(int(p), i) for p, i in zip(pitches, instruments)]
    p_ids = jnp.asarray([a for a, _ in ids], jnp.int32)
    i_ids = jnp.asarray([b for _, b in ids], jnp.int32)
    spec, _ = self._spec_fn(
        self._var_params, self._tok_params, p_ids, i_ids, jnp.asarray(seeds, jnp.int32),
        jax.random.PRNGKey(0), jnp.float32(s.cfg if cfg is None else cfg),
        int(s.top_k if top_k is None else top_k), float(s.top_p if top_p is None else top_p))
    return spec

  def audio(self, spec):
    """(B, F, T) normalised spectrograms -> (B, samples) waveforms (Griffin-Lim in JAX)."""
    return np.asarray(self._audio_fn(spec))

  def generate(self, pitch=60, instrument=None, n=1, seed=0, cfg=None, top_k=None, top_p=None):
    """n notes of one pitch and instrument -> (n, samples) float32; sample i uses seed + i."""
    instrument = self.instruments[0] if instrument is None else instrument
    spec = self.spectrograms([pitch] * n, [instrument] * n, [seed + i for i in range(n)],
                             cfg, top_k, top_p)
    return self.audio(spec)


def _one_device(config):
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  return c
