"""The custom-JVP functions compute what their primitive-op definitions compute, values and
derivatives, and keep less for the backward pass."""
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from mars_jax.models import lean_grads


def _softmax_ref(x):
  e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, -1, keepdims=True)))
  return e / jnp.sum(e, -1, keepdims=True)


def _layer_norm_ref(x, eps):
  mu = jnp.mean(x, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mu), -1, keepdims=True) + eps)


def _l2_ref(x, floor):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), floor))


def _masked(x):
  """Scores with a block-causal pattern of -inf, as the VAR's attention sees them."""
  n = x.shape[-1]
  mask = np.tril(np.ones((n, n), bool))
  return x + jnp.where(mask, 0.0, -jnp.inf)


CASES = {
    'softmax': (lean_grads.softmax, _softmax_ref, (3, 4, 9, 9)),
    'masked_softmax': (lambda x: lean_grads.softmax(_masked(x)),
                       lambda x: _softmax_ref(_masked(x)), (3, 4, 9, 9)),
    'gelu_tanh': (lean_grads.gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True), (5, 7, 32)),
    'layer_norm': (lambda x: lean_grads.layer_norm(x, 1e-6),
                   lambda x: _layer_norm_ref(x, 1e-6), (5, 7, 32)),
    'l2_normalize': (lambda x: lean_grads.l2_normalize(x, 1e-12),
                     lambda x: _l2_ref(x, 1e-12), (5, 7, 4, 8)),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_values_equal_and_gradients_agree(name):
  fn, ref, shape = CASES[name]
  kx, kg = jax.random.split(jax.random.PRNGKey(0))
  x = 3.0 * jax.random.normal(kx, shape, jnp.float32)
  g = jax.random.normal(kg, shape, jnp.float32)   # a random cotangent
  np.testing.assert_array_equal(jax.jit(fn)(x), jax.jit(ref)(x))
  # The primal inside the JVP (what training sees) is the same value, not a re-derivation.
  np.testing.assert_array_equal(jax.jit(lambda x: jax.jvp(fn, (x,), (g,))[0])(x), jax.jit(ref)(x))
  ours = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * g)))(x)
  theirs = jax.jit(jax.grad(lambda x: jnp.sum(ref(x) * g)))(x)
  assert np.all(np.isfinite(ours))
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gelu_is_jax_nn_gelu_bit_for_bit_in_bfloat16():
  """The base config computes in bfloat16: the same constants, rounded the same way."""
  x = (3.0 * jax.random.normal(jax.random.PRNGKey(2), (5, 7, 32))).astype(jnp.bfloat16)
  ours = jax.jit(lean_grads.gelu_tanh)(x)
  theirs = jax.jit(lambda v: jax.nn.gelu(v, approximate=True))(x)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


def test_derivatives_match_finite_differences():
  """A second opinion on the closed forms, independent of JAX's derivatives of the references."""
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 6), jnp.float32)
  for fn in (lean_grads.gelu_tanh, lean_grads.softmax, lambda v: lean_grads.layer_norm(v, 1e-6),
             lambda v: lean_grads.l2_normalize(v, 1e-12)):
    jax.test_util.check_grads(fn, (x,), order=1, modes=('fwd', 'rev'), atol=2e-2, rtol=2e-2)


def test_the_l2_floor_passes_the_tangent_through():
  """Where |x|^2 is under the floor, 1/|x| is a constant: the derivative is 1/sqrt(floor)."""
  x = jnp.zeros((2, 4)).at[1].set(jnp.array([1.0, 2.0, 0.5, -1.0]))
  t = jnp.ones((2, 4))
  _, ours = jax.jvp(lambda v: lean_grads.l2_normalize(v, 1e-4), (x,), (t,))
  _, theirs = jax.jvp(lambda v: _l2_ref(v, 1e-4), (x,), (t,))
  np.testing.assert_allclose(ours[0], 100.0 * t[0])
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize('name,most', [('masked_softmax', 1), ('gelu_tanh', 2), ('layer_norm', 1)])
def test_the_backward_pass_keeps_less(name, most):
  """With a consumer that needs the output (as attention's AV and fc2 do), at most `most`
  tensors of the input's size are saved; the primitive versions keep more."""
  fn, ref, shape = CASES[name]
  x = jnp.ones(shape)

  def big(f):   # the residuals a vjp closes over are the leaves of its function
    _, back = jax.vjp(lambda v, w: f(v) * w, x, jnp.ones(shape[-1:]))
    return sum(1 for a in jax.tree_util.tree_leaves(back) if a.shape == x.shape)

  assert big(fn) <= most < big(ref)


def test_unstack_is_slicing_with_a_stacking_gradient():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 3, 4), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 5, 4), jnp.float32)
  parts = lean_grads.unstack(x, 2)
  assert len(parts) == 3
  for i, p in enumerate(parts):
    np.testing.assert_array_equal(p, x[:, :, i])

  def loss(f):
    return lambda x: sum(jnp.sum(jnp.sin(p) * w[i]) for i, p in enumerate(f(x)))

  ours = jax.grad(loss(lambda x: lean_grads.unstack(x, 2)))(x)
  theirs = jax.grad(loss(lambda x: [x[:, :, i] for i in range(3)]))(x)
  np.testing.assert_array_equal(ours, theirs)
