"""CMX: bit-exact, documented channel order; truncate is the lossy ablation."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mars_jax.audio import cmx as cmx_lib
from mars_jax.audio import spectrogram as sp

FACTORS = (1, 2, 4, 8, 16)


def _tone_spec(tiny_config):
  """A real-ish (128, 128) normalised spectrogram: decaying harmonic tone plus noise."""
  s = tiny_config.spectrogram
  n = int(round(s.sample_rate * s.duration))
  t = np.arange(n) / s.sample_rate
  rng = np.random.default_rng(0)
  x = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 10)) * np.exp(-3 * t)
  x = 0.5 * x / np.abs(x).max() + 1e-3 * rng.standard_normal(n)
  return sp.spectrogram(x.astype(np.float32), s)


def _inputs(tiny_config):
  rng = np.random.default_rng(1)
  return [rng.standard_normal((2, 128, 128)).astype(np.float32), _tone_spec(tiny_config)]


@pytest.mark.parametrize('r', FACTORS)
def test_round_trip_numpy(tiny_config, r):
  for x in _inputs(tiny_config):
    y = cmx_lib.cmx(x, r)
    assert y.shape == x.shape[:-2] + (128 // r, 128 // r, r * r)
    assert np.array_equal(cmx_lib.uncmx(y, r), x)


@pytest.mark.parametrize('r', FACTORS)
def test_round_trip_jax(tiny_config, r):
  for x in _inputs(tiny_config):
    xj = jnp.asarray(x)
    assert np.array_equal(np.asarray(cmx_lib.uncmx(cmx_lib.cmx(xj, r), r)), x)
    y = jax.jit(lambda v: cmx_lib.cmx(v, r))(xj)
    assert np.array_equal(np.asarray(y), cmx_lib.cmx(x, r))
    back = jax.jit(lambda v: cmx_lib.uncmx(v, r))(y)
    assert np.array_equal(np.asarray(back), x)


def test_channel_order():
  """Block offset (i, j) (frequency i, time j) goes to channel i*r + j."""
  r, f, t = 4, 8, 12
  x = np.arange(f * t).reshape(f, t)
  y = cmx_lib.cmx(x, r)
  assert y.shape == (f // r, t // r, r * r)
  for h in range(f // r):
    for w in range(t // r):
      for i in range(r):
        for j in range(r):
          assert y[h, w, i * r + j] == x[h * r + i, w * r + j]


def test_truncate_loses_information():
  r = 4
  x = np.random.default_rng(2).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
  tr = cmx_lib.truncate(x, 16, 16)
  assert tr.shape == (3, 16, 16, 1)
  np.testing.assert_array_equal(tr[..., 0], x[:, :16, :16])
  back = cmx_lib.untruncate(tr, 64, 64)
  assert back.shape == x.shape
  assert not np.array_equal(back, x)  # the content outside the crop is gone...
  assert np.all(back[:, 16:, :] == -1.0) and np.all(back[:, :, 16:] == -1.0)  # ...silence instead
  assert np.array_equal(cmx_lib.uncmx(cmx_lib.cmx(x, r), r), x)  # while CMX keeps it all
  bj = cmx_lib.untruncate(jnp.asarray(tr), 64, 64)
  assert np.array_equal(np.asarray(bj), back)


@pytest.mark.parametrize('mode,shape', [('cmx', (32, 32, 16)), ('truncate', (32, 32, 1)),
                                        ('none', (128, 128, 1))])
def test_to_image_from_image(tiny_config, mode, shape):
  cfg = mlc.ConfigDict({'mode': mode, 'factor': 4})
  x = _tone_spec(tiny_config)[None]  # (1, 128, 128)
  img = cmx_lib.to_image(x, cfg)
  assert img.shape == (1,) + shape
  back = cmx_lib.from_image(img, cfg, 128, 128)
  assert back.shape == x.shape
  if mode == 'truncate':
    assert np.array_equal(back[:, :32, :32], x[:, :32, :32])
    assert not np.array_equal(back, x)
  else:
    assert np.array_equal(back, x)
  imgj = jax.jit(lambda v: cmx_lib.to_image(v, cfg))(jnp.asarray(x))
  assert np.array_equal(np.asarray(imgj), img)
