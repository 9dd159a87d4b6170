"""Reads one clip into exactly the shape the front end expects, or says why it cannot.

Rules (one per kind of bad input; `prepare` counts every skip and fix in the manifest):

  skipped (BadAudio; manifest `skipped` with the reason, `skipped_counts` by kind):
    unreadable   missing, empty (0 bytes or 0 frames), truncated (a WAV whose data chunk
                 promises more bytes than the file holds) or corrupt file, or not audio
    non-finite   any NaN or Inf sample
    silent       peak of the kept clip below data.silence_db dBFS (default -60)
    missing labels   (decided by the source, before audio is read)
  fixed (manifest `fixed` counts; the clip is kept):
    downmixed    stereo / multichannel -> mean of the channels
    resampled    other sample rate -> spectrogram.sample_rate (soxr 'HQ', = librosa.resample)
    padded       shorter than spectrogram.duration -> zeros appended at the end
    cropped      longer -> the first spectrogram.duration seconds are kept
"""
from __future__ import annotations

import io
import os
import struct

import numpy as np

from mars_jax import fs

FIXES = ('resampled', 'downmixed', 'padded', 'cropped')
SKIP_KINDS = ('unreadable', 'non-finite', 'silent', 'missing labels')


class BadAudio(Exception):
  """The clip cannot be used; str(e) is the reason, 'kind: detail'."""


def reason_kind(reason: str) -> str:
  return reason.split(':', 1)[0].strip()


def resample(wave, orig_sr, target_sr):
  """Same numbers as librosa.resample(res_type='soxr_hq') (soxr, then fixed to ceil length),
  without importing librosa, whose first resample costs seconds in every worker process."""
  import soxr
  y = soxr.resample(np.ascontiguousarray(wave, dtype=np.float32), orig_sr, target_sr,
                    quality='soxr_hq')
  n = int(np.ceil(len(wave) * target_sr / orig_sr))
  return np.pad(y, (0, max(0, n - len(y))))[:n].astype(np.float32, copy=False)


def _wav_truncated(f, size):
  """For RIFF/WAVE files: a reason if the data chunk is cut short, else None.

  f: a seekable binary file of `size` bytes."""
  head = f.read(12)
  if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'WAVE':
    return None  # not RIFF: leave it to libsndfile
  pos = 12
  while pos + 8 <= size:
    f.seek(pos)
    cid, n = struct.unpack('<4sI', f.read(8))
    if cid == b'data':
      if n in (0, 0xFFFFFFFF):  # streamed writers leave the size open
        return None
      have = size - pos - 8
      if have < n:
        return f'unreadable: truncated WAV ({have} of {n} data bytes)'
      return None
    pos += 8 + n + (n & 1)
  return 'unreadable: truncated WAV (no data chunk)'


def _open_audio(path):
  """-> (seekable binary file, size). A bucket object (gs://) is read whole (one GET, a note is
  ~100 KB); a local file is opened, so only what the clip uses is read."""
  if fs.is_remote(path):
    try:
      blob = fs.read_bytes(path)
    except FileNotFoundError:
      raise BadAudio(f'unreadable: no such file {path}') from None
    return io.BytesIO(blob), len(blob)
  if not os.path.exists(path):
    raise BadAudio(f'unreadable: no such file {path}')
  return open(path, 'rb'), os.path.getsize(path)


def _read_path(path, target_sr, n_samples):
  """-> (data (N, C) float32, sr, total frames); reads only what the clip can use."""
  import soundfile as sf
  f, size = _open_audio(path)
  with f:
    if size == 0:
      raise BadAudio('unreadable: empty file (0 bytes)')
    why = _wav_truncated(f, size)
    if why:
      raise BadAudio(why)
    f.seek(0)
    try:   # libsndfile reads a local path itself (faster than through a Python file)
      with sf.SoundFile(f if fs.is_remote(path) else path) as snd:
        sr, total = snd.samplerate, snd.frames
        want = int(np.ceil(n_samples * sr / target_sr)) + 64  # margin for the resampler
        data = snd.read(frames=min(total, want), dtype='float32', always_2d=True)
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / ValueError
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise BadAudio(f'unreadable: {msg}') from e
  return data, sr, total


def load_clip(path_or_loader, target_sr: int, n_samples: int, silence_db: float = -60.0):
  """-> (wave float32 (n_samples,), fixes: list of FIXES) or raises BadAudio(reason).

  path_or_loader: a file path, or a callable returning (wave, sr) (wave (N,) or (N, C))
  or a path.
  """
  src = path_or_loader
  if callable(src):
    src = src()
  fixes = []
  if isinstance(src, (str, os.PathLike)):
    data, sr, total = _read_path(os.fspath(src), target_sr, n_samples)
  else:
    wave, sr = src
    data = np.asarray(wave, dtype=np.float32)
    if data.ndim == 1:
      data = data[:, None]
    elif data.ndim != 2:
      raise BadAudio(f'unreadable: wave of shape {data.shape}, expected (N,) or (N, C)')
    total = data.shape[0]
  if total == 0 or data.size == 0:
    raise BadAudio('unreadable: no samples')
  if not np.isfinite(data).all():
    raise BadAudio('non-finite: NaN or Inf samples')
  if data.shape[1] > 1:
    wave = data.mean(axis=1)
    fixes.append('downmixed')
  else:
    wave = data[:, 0]
  sr = int(sr)
  if sr != target_sr:
    wave = resample(wave, sr, target_sr)
    fixes.append('resampled')
    full = int(np.ceil(total * target_sr / sr))
  else:
    full = total
  if full < n_samples:
    wave = np.pad(wave[:n_samples], (0, n_samples - min(len(wave), n_samples)))
    fixes.append('padded')
  elif full > n_samples:
    fixes.append('cropped')
  wave = np.ascontiguousarray(wave[:n_samples], dtype=np.float32)
  if len(wave) < n_samples:  # resampler rounding on a clip of exactly the right length
    wave = np.pad(wave, (0, n_samples - len(wave)))
  peak = float(np.abs(wave).max())
  if peak <= 10.0 ** (silence_db / 20.0):
    db = 20 * np.log10(peak) if peak > 0 else float('-inf')
    raise BadAudio(f'silent: peak {db:.1f} dBFS below data.silence_db={silence_db:g}')
  return wave, fixes
