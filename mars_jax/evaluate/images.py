"""Spectrogram images as PNG bytes, with no imaging library (zlib + a colour map)."""
import struct
import zlib

import numpy as np

# A perceptual-ish dark-blue -> purple -> orange -> yellow ramp (magma-like), 5 anchors.
_ANCHORS = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]],
                    np.float32)


def colourise(x, lo=-1.0, hi=1.0):
  """(H, W) values -> (H, W, 3) uint8 through the ramp; values outside [lo, hi] clip."""
  t = np.clip((np.asarray(x, np.float32) - lo) / (hi - lo), 0.0, 1.0) * (len(_ANCHORS) - 1)
  i = np.minimum(t.astype(np.int32), len(_ANCHORS) - 2)
  f = (t - i)[..., None]
  return ((1 - f) * _ANCHORS[i] + f * _ANCHORS[i + 1]).round().astype(np.uint8)


def png_bytes(rgb):
  """(H, W, 3) uint8 -> PNG file bytes."""
  rgb = np.ascontiguousarray(rgb, np.uint8)
  h, w, _ = rgb.shape
  raw = b''.join(b'\x00' + rgb[r].tobytes() for r in range(h))

  def chunk(tag, data):
    return (struct.pack('>I', len(data)) + tag + data
            + struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(raw, 6)) + chunk(b'IEND', b''))


def spectrogram_png(spec) -> bytes:
  """(F, T) normalised spectrogram -> PNG bytes, low frequencies at the bottom."""
  return png_bytes(colourise(np.asarray(spec)[::-1]))
