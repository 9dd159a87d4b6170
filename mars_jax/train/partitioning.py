"""Device mesh, logical-axis rules and batch placement: the only place that knows the mesh layout.

Parameters carry logical axis names (('embed', 'mlp'), ...); `config.mesh.rules` maps them to the
mesh axes ('data', 'fsdp', 'tensor'). Axes are Auto (pjit-style): logical constraints are hints,
not asserts, and a dimension a mesh axis does not divide is simply replicated along it.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mars_jax.config import ConfigError, mesh_shape

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')   # the leading (example) axis is split over both


def make_mesh(config, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh sized by config.mesh (-1 = the rest) over `devices`."""
  explicit = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  auto = (AxisType.Auto,) * len(AXES)
  if not explicit:
    # jax.make_mesh orders devices by the physical topology (ICI rings on TPU / NVLink on GPU).
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=auto)


def logical_rules(config) -> tuple:
  """config.mesh.rules as flax wants them: ((logical, mesh_axis | tuple | None), ...)."""
  rules = []
  for name, axes in config.mesh.rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in AXES]
    else:
      bad = [] if axes is None or axes in AXES else [axes]
    if bad:
      raise ConfigError(f'mesh.rules maps {name!r} to unknown mesh axes {bad}; use {AXES} or None.')
    rules.append((str(name), axes))
  return tuple(rules)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _fit(sharding: NamedSharding, shape) -> NamedSharding:
  """Drops mesh axes from dimensions they do not divide (e.g. 3 channels over fsdp=4)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  changed = False
  for i, entry in enumerate(spec[:len(shape)]):
    if entry is not None and shape[i] % _axis_size(sharding.mesh, entry):
      spec[i] = None
      changed = True
  if not changed:
    return sharding
  return NamedSharding(sharding.mesh, P(*spec[:len(shape)]))


def unbox(tree):
  """Strips logical boxes without adding sharding constraints (safe outside jit, on shapes)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return x.unbox(apply_constraint=False)
    return x.unbox() if is_box(x) else x
  return jax.tree.map(one, tree, is_leaf=is_box)


def shardings_of(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree that may hold nn.Partitioned logical boxes (e.g. eval_shape(init)).

  Returns a tree shaped like the *unboxed* tree; leaves without a box are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)           # boxes -> logical PartitionSpec
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = unbox(abstract_tree)
  return jax.tree.map(lambda s, x: _fit(s, np.shape(x)), shardings, shapes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples (leading axis) split over data x fsdp; other dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _global_entries(local_batch: dict):
  """(key, per-process numpy value, global shape) of each numeric batch entry; strings dropped."""
  n_proc = jax.process_count()
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.dtype.kind not in 'biufc':
      continue
    if v.ndim == 0:
      raise ValueError(f'batch[{k!r}] is a scalar; every batch entry needs a leading example axis.')
    yield k, v, (v.shape[0] * n_proc,) + v.shape[1:]


def put_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax Arrays sharded over ('data', 'fsdp').

  Each process passes its own slice (rows = global batch / process count); works unchanged for
  one process and for a multi-host pod. Non-numeric entries (e.g. strings) are dropped.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, shape)
          for k, v, shape in _global_entries(local_batch)}


def abstract_batch(local_batch: dict, mesh: Mesh) -> dict:
  """ShapeDtypeStructs (global shapes, batch sharding) of a per-process batch, for lowering."""
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, v.dtype, sharding=sharding)
          for k, v, shape in _global_entries(local_batch)}
