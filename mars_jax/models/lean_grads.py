"""Softmax, tanh-GELU, LayerNorm and L2 normalisation whose backward pass keeps little.

Differentiated through their primitives, these functions make JAX save every intermediate the
chain rule touches: a softmax keeps its masked scores, their exponentials and its output (three
(B, H, L, L) tensors where one is enough), the tanh GELU six (B, L, 4C) tensors, a LayerNorm
three (B, L, C). Inside the VAR's layer scan each saved tensor is also stacked over the layers,
so on a CPU the step spends much of its time writing and reading them. Each function here has a
custom JVP written from its closed-form derivative, so the backward pass keeps what that
derivative needs (the output, one derivative tensor or a row statistic) and nothing else.

The forward values are the same operations as before, so outputs are bit-identical and
gradients agree to float rounding (tests/test_lean_grads.py). jax.nn.softmax has such a rule
only behind the `jax_softmax_custom_jvp` flag, a process-wide switch model code must not flip.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@jax.custom_jvp
def softmax(x):
  """Softmax over the last axis; -inf entries get weight exactly 0. Saves only its output."""
  e = jnp.exp(x - jnp.max(x, -1, keepdims=True))
  return e / jnp.sum(e, -1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = softmax(x)
  # dy = y * (t - <y, t>); masked entries have y = 0 and a zero tangent, so no inf * 0 appears.
  return y, y * (t - jnp.sum(y * t, -1, keepdims=True))


def _gelu_parts(x):
  """tanh GELU in jax.nn.gelu's exact operation order, and the tanh its derivative reuses."""
  th = jnp.tanh(_GELU_C * (x + _GELU_A * (x ** 3)))
  return x * (0.5 * (1.0 + th)), th


@jax.custom_jvp
def gelu_tanh(x):
  """GELU with the tanh approximation (jax.nn.gelu(approximate=True)). Saves its derivative."""
  return _gelu_parts(x)[0]


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y, th = _gelu_parts(x)
  # d/dx 0.5 x (1 + tanh u) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u',  u' = c (1 + 3 a x^2)
  dy = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * (_GELU_C * (1 + 3 * _GELU_A * x * x))
  return y, dy * t


def _standardize(x, eps):
  mu = jnp.mean(x, -1, keepdims=True)
  xc = x - mu
  r = jax.lax.rsqrt(jnp.mean(jnp.square(xc), -1, keepdims=True) + eps)
  return xc * r, r


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def layer_norm(x, eps):
  """(x - mean) / sqrt(var + eps) over the last axis, no affine. Saves its output and 1/std."""
  return _standardize(x, eps)[0]


@layer_norm.defjvp
def _layer_norm_jvp(eps, primals, tangents):
  (x,), (t,) = primals, tangents
  y, r = _standardize(x, eps)
  dy = r * (t - jnp.mean(t, -1, keepdims=True) - y * jnp.mean(y * t, -1, keepdims=True))
  return y, dy


def _unit(x, floor):
  ss = jnp.sum(x * x, -1, keepdims=True)
  r = jax.lax.rsqrt(jnp.maximum(ss, floor))
  return x * r, r, ss > floor


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def l2_normalize(x, floor):
  """x / max(|x|, sqrt(floor)) over the last axis. Saves its output and 1/|x|."""
  return _unit(x, floor)[0]


@l2_normalize.defjvp
def _l2_normalize_jvp(floor, primals, tangents):
  (x,), (t,) = primals, tangents
  y, r, free = _unit(x, floor)
  # Where the floor binds, 1/|x| is a constant and dy = r t; elsewhere the radial part goes.
  radial = jnp.where(free, jnp.sum(y * t, -1, keepdims=True), 0.0)
  return y, r * (t - y * radial)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack(x, axis):
  """The slices of x along `axis`, as a tuple. Its gradient stacks the slices' gradients in one
  write; slicing's own transpose pads each gradient to x's full size with zeros and adds them."""
  return tuple(jnp.moveaxis(x, axis, 0))


def _unstack_fwd(x, axis):
  return unstack(x, axis), None


def _unstack_bwd(axis, _, grads):
  return (jnp.stack(grads, axis),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)
