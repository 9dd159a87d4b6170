"""Multi-scale quantizer: PyTorch-exact resampling, VAR semantics, AR helper consistency."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars_jax.models import quantizer as qz

SCALES = (1, 2, 4, 8)


# --------------------------------------------------------------------------- references

def adaptive_avg_pool_ref(x, p):
  """Direct loop of PyTorch adaptive_avg_pool2d (= interpolate mode='area'), NHWC."""
  b, h, w, c = x.shape
  out = np.zeros((b, p, p, c), np.float64)
  for i in range(p):
    h0, h1 = (i * h) // p, -((-(i + 1) * h) // p)
    for j in range(p):
      w0, w1 = (j * w) // p, -((-(j + 1) * w) // p)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def bicubic_ref(x, size, a=-0.75):
  """PyTorch upsample_bicubic2d (align_corners=False) written pixel by pixel, NHWC."""
  def w(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0
  b, h, wd, c = x.shape
  out = np.zeros((b, size, size, c), np.float64)
  for oy in range(size):
    sy = (oy + 0.5) * h / size - 0.5
    y0 = int(np.floor(sy))
    for ox in range(size):
      sx = (ox + 0.5) * wd / size - 0.5
      x0 = int(np.floor(sx))
      acc = 0.0
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          yy = min(max(y0 + dy, 0), h - 1)
          xx = min(max(x0 + dx, 0), wd - 1)
          acc = acc + w(sy - (y0 + dy)) * w(sx - (x0 + dx)) * x[:, yy, xx]
      out[:, oy, ox] = acc
  return out


# --------------------------------------------------------------------------- resampling

@pytest.mark.parametrize('h,p', [(16, 13), (16, 5), (8, 3), (13, 6), (16, 1)])
def test_area_downsample_is_adaptive_avg_pool(h, p):
  x = np.random.RandomState(h * 31 + p).randn(2, h, h, 3).astype(np.float32)
  got = np.asarray(qz.area_downsample(jnp.asarray(x), p))
  np.testing.assert_allclose(got, adaptive_avg_pool_ref(x, p), atol=1e-5)


def test_area_downsample_differs_from_jax_antialiased_resize():
  """Why this exists: jax.image.resize has no torch-'area' mode; its antialiased resize differs."""
  x = np.random.RandomState(0).randn(1, 16, 16, 2).astype(np.float32)
  ours = np.asarray(qz.area_downsample(jnp.asarray(x), 13))
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (1, 13, 13, 2), 'linear', antialias=True))
  assert np.abs(ours - theirs).max() > 1e-3


def test_bicubic_of_1x1_is_constant():
  x = jnp.asarray(np.random.RandomState(1).randn(2, 1, 1, 4).astype(np.float32))
  y = np.asarray(qz.upsample_bicubic(x, 8))
  np.testing.assert_allclose(y, np.broadcast_to(np.asarray(x), y.shape), atol=1e-6)


def test_bicubic_known_values():
  """[0, 1] upsampled to 4 with a=-0.75, align_corners=False (values worked out by hand)."""
  m = qz.bicubic_matrix(2, 4)
  np.testing.assert_allclose(m @ np.array([0.0, 1.0]),
                             [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-6)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize('h,size', [(2, 8), (3, 13), (5, 16), (4, 8)])
def test_bicubic_matches_pytorch_formula(h, size):
  x = np.random.RandomState(h + size).randn(1, h, h, 2).astype(np.float32)
  got = np.asarray(qz.upsample_bicubic(jnp.asarray(x), size))
  np.testing.assert_allclose(got, bicubic_ref(x, size), atol=1e-5)
  # jax's own cubic is the Keys a=-0.5 kernel: measurably different.
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (1, size, size, 2), 'cubic'))
  assert np.abs(got - theirs).max() > 1e-3


def test_phi_index_partially_shared():
  idx = [qz.phi_index(k, 10, 4) for k in range(10)]
  assert idx[0] == 0 and idx[-1] == 3
  assert all(b >= a for a, b in zip(idx, idx[1:])) and set(idx) == {0, 1, 2, 3}
  assert idx == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # VAR's float tie-break at k=2 included
  assert [qz.phi_index(k, 4, 2) for k in range(4)] == [0, 0, 1, 1]
  assert [qz.phi_index(k, 3, 1) for k in range(3)] == [0, 0, 0]


# --------------------------------------------------------------------------- lookup / stats

@pytest.mark.parametrize('lookup', ['l2', 'cosine'])
def test_nearest_code_matches_brute_force(lookup):
  rs = np.random.RandomState(2)
  z = rs.randn(50, 16).astype(np.float32)
  e = rs.randn(32, 16).astype(np.float32) * rs.uniform(0.1, 3, (32, 1)).astype(np.float32)
  got = np.asarray(qz.nearest_code(jnp.asarray(z), jnp.asarray(e), lookup))
  if lookup == 'l2':
    ref = ((z[:, None] - e[None]) ** 2).sum(-1).argmin(1)
  else:
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    en = e / np.linalg.norm(e, axis=1, keepdims=True)
    ref = (zn @ en.T).argmax(1)
  np.testing.assert_array_equal(got, ref)


def test_cosine_lookup_zero_residual_is_finite():
  idx = qz.nearest_code(jnp.zeros((3, 16)), jnp.ones((8, 16)), 'cosine')
  assert idx.dtype == jnp.int32 and bool(jnp.all((idx >= 0) & (idx < 8)))


def test_code_stats():
  counts, usage, ppl = qz.code_stats(jnp.array([[0, 0], [1, 1]]), 4)
  np.testing.assert_allclose(counts, [2, 2, 0, 0])
  assert float(usage) == pytest.approx(0.5)
  assert float(ppl) == pytest.approx(2.0, rel=1e-5)


def test_reseed_dead_codes_replaces_only_dead():
  rs = np.random.RandomState(3)
  cb = jnp.asarray(rs.randn(8, 4).astype(np.float32))
  counts = jnp.asarray(np.array([[3, 0, 1, 0, 0, 5, 0, 2], [0, 0, 0, 0, 1, 0, 0, 0]], np.float32))
  dead = np.array([False, True, False, True, False, False, True, False])
  for n in (20, 5):  # enough candidates (distinct picks) and too few (with replacement)
    cand = jnp.asarray(rs.randn(n, 4).astype(np.float32) + 100.0)
    new = np.asarray(jax.jit(qz.reseed_dead_codes)(cb, counts, cand, jax.random.key(0)))
    np.testing.assert_array_equal(new[~dead], np.asarray(cb)[~dead])
    cand_np = np.asarray(cand)
    for row in new[dead]:
      assert np.any(np.all(row == cand_np, axis=1))
    if n >= 8:
      assert len({tuple(r) for r in new[dead]}) == dead.sum()


# --------------------------------------------------------------------------- module

@pytest.fixture(scope='module')
def quant():
  q = qz.MultiScaleQuantizer(codebook_size=64, dim=16, scales=SCALES, num_phi=2)
  f = jnp.asarray(np.random.RandomState(4).randn(3, 8, 8, 16).astype(np.float32))
  params = jax.jit(q.init)(jax.random.key(0), f)
  return q, params, f


def test_quantizer_param_names(quant):
  q, params, _ = quant
  from flax import linen as nn
  specs = nn.get_partition_spec(params)['params']
  assert tuple(specs['codebook']) == ('codes', None)
  assert tuple(specs['phis_0']['Conv_0']['kernel']) == (None, None, 'conv_in', 'conv_out')
  assert all(isinstance(b, nn.Partitioned)
             for b in jax.tree.leaves(params, is_leaf=lambda b: isinstance(b, nn.Partitioned)))


def test_forward_and_ar_helpers_agree(quant):
  q, params, f = quant
  num = len(SCALES)

  @jax.jit
  def run(params, f):
    f_st, aux = q.apply(params, f)
    tokens = aux['tokens']
    fh_idx = q.apply(params, tokens, method=q.idx_to_fhat)
    teacher = q.apply(params, tokens, method=q.idx_to_teacher_inputs)
    f_hat = jnp.zeros_like(f)
    nexts = []
    for k in range(num):  # tokens passed flattened, as a sampler produces them
      f_hat, nxt = q.apply(params, k, f_hat, tokens[k].reshape(f.shape[0], -1),
                           method=q.next_input)
      if nxt is not None:
        nexts.append(nxt)
    enc = q.apply(params, f, method=q.encode_tokens)
    codes = q.apply(params, tokens[-1], method=q.lookup_codes)
    first = qz.area_downsample(q.apply(params, tokens[:1], method=q.idx_to_fhat), SCALES[1])
    return f_st, aux, fh_idx, teacher, f_hat, jnp.concatenate(nexts, 1), enc, codes, first

  f_st, aux, fh_idx, teacher, fh_next, teacher_next, enc, codes, first = run(params, f)
  assert [t.shape for t in aux['tokens']] == [(3, p, p) for p in SCALES]
  assert all(t.dtype == jnp.int32 for t in aux['tokens'])
  np.testing.assert_allclose(fh_idx, aux['f_hat'], atol=1e-6)
  np.testing.assert_allclose(fh_next, aux['f_hat'], atol=1e-6)
  np.testing.assert_allclose(f_st, aux['f_hat'], atol=1e-5)
  assert teacher.shape == (3, sum(p * p for p in SCALES[1:]), 16)
  np.testing.assert_allclose(teacher_next, teacher, atol=1e-6)
  for a, b in zip(enc, aux['tokens']):
    np.testing.assert_array_equal(a, b)
  assert codes.shape == (3, 8, 8, 16)
  # The first teacher tokens are f_hat after scale 1 alone, pooled to 2x2, row-major.
  np.testing.assert_allclose(teacher[:, :4], first.reshape(3, 4, 16), atol=1e-6)
  # Residual VQ: the reconstruction is closer to f than the zero map, and stats are sane.
  assert float(jnp.mean((aux['f_hat'] - f) ** 2)) < float(jnp.mean(f ** 2))
  assert aux['usage'].shape == (num,) and aux['code_counts'].shape == (num, 64)
  np.testing.assert_allclose(aux['code_counts'].sum(1), [3 * p * p for p in SCALES])
  assert aux['residuals'].shape == (3 * sum(p * p for p in SCALES), 16)


def test_vq_loss_and_gradients(quant):
  q, params, f = quant
  g = jnp.asarray(np.random.RandomState(5).randn(*f.shape).astype(np.float32))

  @jax.jit
  def grads(params, f):
    def st(f):
      f_st, _ = q.apply(params, f)
      return jnp.sum(f_st * g)

    def vq(p):
      return q.apply(p, f)[1]['vq_loss']
    return jax.grad(st)(f), jax.grad(vq)(params), q.apply(params, f)[1]

  gf, gp, aux = grads(params, f)
  np.testing.assert_allclose(gf, g, atol=1e-5)  # straight-through estimator
  gcb = np.asarray(gp['params']['codebook'].value)
  used = np.asarray(aux['code_counts'].sum(0) > 0)
  assert np.abs(gcb[used]).sum() > 0 and np.all(gcb[~used] == 0)
  assert np.abs(np.asarray(gp['params']['phis_1']['Conv_0']['kernel'].value)).sum() > 0
  # vq_loss at the last scale alone: (1 + beta) * mse(f_hat, f) weighted by 1/K.
  assert float(aux['vq_loss']) > (1.25 / len(SCALES)) * float(jnp.mean((aux['f_hat'] - f) ** 2))


def test_quantizer_dropout_truncates_per_example(quant):
  _, params, f = quant
  q = qz.MultiScaleQuantizer(codebook_size=64, dim=16, scales=SCALES, num_phi=2,
                             quant_dropout=1.0)
  f8 = jnp.concatenate([f, f, f[:2]])  # 8 examples

  @jax.jit
  def run(params, f8):
    _, aux_d = q.apply(params, f8, deterministic=False, rngs={'dropout': jax.random.key(7)})
    _, aux = q.apply(params, f8)
    partial, f_hat = [], jnp.zeros_like(f8)
    for k in range(len(SCALES)):
      f_hat, _ = q.apply(params, k, f_hat, aux['tokens'][k], method=q.next_input)
      partial.append(f_hat)
    return aux_d, aux, jnp.stack(partial, 1)  # (B, K, h, w, d)

  aux_d, aux, partial = run(params, f8)
  err = jnp.max(jnp.abs(partial - aux_d['f_hat'][:, None]), axis=(2, 3, 4))  # (B, K)
  stop = np.asarray(jnp.argmin(err, axis=1))
  assert np.all(np.asarray(jnp.min(err, axis=1)) < 1e-5)  # each f_hat is a prefix sum
  assert stop.min() < len(SCALES) - 1  # some examples really were truncated
  np.testing.assert_allclose(aux['f_hat'], partial[:, -1], atol=1e-6)  # deterministic: no dropout
