"""Where quality is lost: held-out real notes at each stage a generated note goes through.

A generated note can be no better than the tokenizer's round trip, and that no better than
Griffin-Lim of the true spectrogram (README.md, Evaluation). `round_trip_fn` builds the one pure
JAX function (jit it once) that takes true spectrograms through both, exactly as the sampler
treats its output: decoded spectrogram clipped to [-1, 1], Griffin-Lim from zero phase with the
config's iterations and momentum, audio clipped to [-1, 1] (what a 16-bit wav holds). The
scoring functions then apply the same estimators to every stage.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import griffin_lim
from mars_jax.audio import spectrogram as spec_lib
from mars_jax.evaluate import metrics as M


def round_trip_fn(model, config, shapes, with_gl=True):
  """fn(params, images (B, H, W, C)) -> {name: (B, ...)} (pure JAX, jit it):

  gl_wave / gl_spec: Griffin-Lim of the true spectrogram and its re-analysed spectrogram
  (only with_gl: they do not change while a tokenizer trains);
  recon_spec: the tokenizer's decoded spectrogram (encode -> tokens -> decode, clipped);
  recon_wave / recon_audio_spec: Griffin-Lim of recon_spec and its re-analysed spectrogram.
  `model.apply({'params': p}, images)` must return (reconstructed images, aux) as the
  Tokenizer does.
  """
  spec_cfg, F, T = config.spectrogram, shapes.freq_bins, shapes.frames

  def fn(params, images):
    images = images.astype(jnp.float32)
    true = cmx_lib.from_image(images, config.cmx, F, T)                        # (B, F, T)
    recon_img = model.apply({'params': params}, images)[0].astype(jnp.float32)
    recon = jnp.clip(cmx_lib.from_image(recon_img, config.cmx, F, T), -1.0, 1.0)
    specs = jnp.concatenate([true, recon]) if with_gl else recon               # one program
    waves = jnp.clip(griffin_lim.to_audio(specs, spec_cfg), -1.0, 1.0)       # (2B or B, N)
    heard = spec_lib.spectrogram(waves, spec_cfg)                             # (2B or B, F, T)
    b = waves.shape[0] - images.shape[0]
    out = {'recon_spec': recon, 'recon_wave': waves[b:], 'recon_audio_spec': heard[b:]}
    if with_gl:
      out.update(gl_wave=waves[:b], gl_spec=heard[:b])
    return out

  return fn


def pitch_scores(waves, sample_rate, midi, prefix):
  """{prefix}pitch_{exact,within_semitone,detected} by librosa.pyin (metrics.pitch_accuracy)."""
  if len(waves) == 0:
    return {f'{prefix}pitch_{k}': float('nan') for k in ('exact', 'within_semitone', 'detected')}
  r = M.pitch_accuracy(waves, sample_rate, midi)
  return {f'{prefix}pitch_exact': r['exact'],
          f'{prefix}pitch_within_semitone': r['within_semitone'],
          f'{prefix}pitch_detected': r['detected']}


def spectrogram_errors(specs, true, prefix):
  """{prefix}mse, {prefix}mae of (N, F, T) spectrograms against the true ones (normalised)."""
  r = M.recon_errors(specs, true)
  return {f'{prefix}mse': r['mse'], f'{prefix}mae': r['mae']}


def score(outputs, true_specs, sample_rate, midi):
  """Pitch and spectrogram errors of one batch of round_trip_fn outputs (numpy):
  gl_* and recon_* pitch, gl_mse/mae and recon_audio_mse/mae (re-analysed audio against the
  true spectrogram), recon_mse/mae (decoded spectrogram against the true one)."""
  out = {}
  out.update(pitch_scores(outputs['gl_wave'], sample_rate, midi, 'gl_'))
  out.update(pitch_scores(outputs['recon_wave'], sample_rate, midi, 'recon_'))
  out.update(spectrogram_errors(outputs['gl_spec'], true_specs, 'gl_'))
  out.update(spectrogram_errors(outputs['recon_audio_spec'], true_specs, 'recon_audio_'))
  out.update(spectrogram_errors(outputs['recon_spec'], true_specs, 'recon_'))
  return out


def spread(labels, per_label, max_labels, key=None):
  """Indices of at most `per_label` items for each of at most `max_labels` labels, spread
  evenly over each label's items in `key` order (e.g. pitch): listening examples that cover
  the range instead of its first few notes."""
  labels = np.asarray(labels)
  key = np.arange(len(labels)) if key is None else np.asarray(key)
  u = np.unique(labels)
  if len(u) > max_labels:
    u = u[np.unique(np.round(np.linspace(0, len(u) - 1, max_labels)).astype(int))]
  chosen = []
  for lab in u:
    idx = np.flatnonzero(labels == lab)
    idx = idx[np.argsort(key[idx], kind='stable')]
    take = np.unique(np.round(np.linspace(0, len(idx) - 1, min(per_label, len(idx))))
                     .astype(int))
    chosen += [int(i) for i in idx[take]]
  return chosen
