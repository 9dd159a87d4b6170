"""Spectrogram images people can read: frequency in Hz, time in seconds, a colour bar in dB.

Drawn with matplotlib's Agg canvas through librosa.display.specshow, on `Figure` objects
(never pyplot's global state: safe in any process, no figure leaks). One figure per image
shape is kept, its axes drawn once; each image then redraws only the spectrogram.
"""
from __future__ import annotations

import io
import math

import numpy as np

from mars_jax.audio import librosa_loader

_DPI = 100


def _db_scale(spec_cfg):
  """Normalised value y in [-1, 1] -> dB full scale of (magnitude + eps): the front end maps
  log(mag + eps) linearly from [log(eps), log_max] to [-1, 1] (audio.spectrogram.normalise)."""
  lo, hi = math.log(float(spec_cfg.log_eps)), float(spec_cfg.log_max)
  to_db = 20.0 / math.log(10.0)
  return lambda y: ((np.asarray(y, np.float64) + 1.0) * 0.5 * (hi - lo) + lo) * to_db


def _axes(F, T, spec_cfg):
  """Cell edges (y in Hz, x in seconds) of an (F, T), possibly pooled, spectrogram."""
  sr, n_fft, hop = float(spec_cfg.sample_rate), int(spec_cfg.n_fft), int(spec_cfg.hop)
  df = sr / n_fft * max(1, (n_fft // 2) // F)           # Hz per row (after any pooling)
  dt = hop / sr                                          # seconds per column
  duration = getattr(spec_cfg, 'duration', None)
  if duration:                                           # stored frames = samples / hop
    dt *= max(1, int(round(float(duration) * sr / hop)) // T)
  return np.arange(F + 1) * df, np.arange(T + 1) * dt


_FIGURES = {}   # (shape, axes, size) -> (canvas, mesh, background): built once, ~0.2 s each


def _figure(F, T, spec_cfg, size):
  """A cached figure for this shape and these axes, its empty mesh, and the pixels of
  everything but the mesh (ticks, labels and colour bar cost ~10x the mesh to draw)."""
  y, x = _axes(F, T, spec_cfg)
  db = _db_scale(spec_cfg)
  key = (F, T, float(y[-1]), float(x[-1]), float(db(-1.0)), float(db(1.0)), tuple(size))
  if key not in _FIGURES:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    librosa_loader.load()              # librosa.display imports the compiled modules
    import librosa.display
    fig = Figure(figsize=size, dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.2, 0.17, 0.62, 0.78))
    cax = fig.add_axes((0.84, 0.17, 0.03, 0.78))
    mesh = librosa.display.specshow(np.zeros((F, T)), x_coords=x, y_coords=y,
                                    sr=float(spec_cfg.sample_rate), hop_length=int(spec_cfg.hop),
                                    x_axis='s', y_axis='hz', ax=ax, cmap='magma',
                                    vmin=float(db(-1.0)), vmax=float(db(1.0)))
    ax.set_xlabel('time (s)', fontsize=7, labelpad=1)
    ax.set_ylabel('frequency (Hz)', fontsize=7, labelpad=1)
    ax.tick_params(labelsize=6)
    bar = fig.colorbar(mesh, cax=cax, format='%+.0f')
    bar.set_label('dB full scale', fontsize=7, labelpad=1)
    bar.ax.tick_params(labelsize=6)
    mesh.set_visible(False)
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    mesh.set_visible(True)
    _FIGURES[key] = (canvas, mesh, background)
  return _FIGURES[key]


def spectrogram_png(spec, spec_cfg, size=(3.2, 2.4)) -> bytes:
  """(F, T) normalised spectrogram (Nyquist bin and last frame dropped, as the front end stores
  it; possibly average-pooled) -> PNG bytes with axes in Hz and seconds and a dB colour bar.

  spec_cfg needs sample_rate, n_fft, hop, log_eps and log_max (config.spectrogram); with
  `duration` too, a time-pooled spectrogram keeps its true time axis. The colour scale is the
  front end's whole range (fixed, never per image), so images compare with each other.
  """
  from PIL import Image   # matplotlib's own PNG writer
  spec = np.asarray(spec, np.float32)
  canvas, mesh, background = _figure(*spec.shape, spec_cfg, size)
  canvas.restore_region(background)
  mesh.set_array(_db_scale(spec_cfg)(spec).ravel())
  mesh.axes.draw_artist(mesh)
  for spine in mesh.axes.spines.values():   # the frame stays on top of the image
    mesh.axes.draw_artist(spine)
  rgb = np.asarray(canvas.buffer_rgba())[..., :3]
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format='png', compress_level=3)
  return buf.getvalue()
