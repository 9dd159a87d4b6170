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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mars_jax.config import ConfigError, mesh_shape

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')   # the leading (example) axis is split over both


def make_mesh(config, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh sized by config.mesh (-1 = the rest) over `devices`.

  Devices are laid out by the physical topology (jax's mesh_utils: ICI torus axes on TPU, device
  ids on GPU, the given order on CPU). On a TPU slice every mesh axis must be a product of whole
  physical axes (a v5p-128 is 4x4x4: fsdp may be 1, 4, 16 or 64, not 8; jax splits a physical
  axis only on v5e). When config.mesh.data is -1 and mesh.fsdp does not fit, the nearest fsdp that
  does is used instead (the smallest larger one, so the train state per chip does not grow) and
  a line says so; with data fixed too, a ConfigError names the valid mesh.fsdp values for this
  slice. Several slices (multislice) put `data` across slices. Also checked: every `tensor` group
  lies within one process, since each process feeds its own rows of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  grid = device_grid(shape, devices)
  if grid is None:
    shape = _refit(config, shape, devices)
    grid = device_grid(shape, devices)
  _check_tensor_within_process(grid)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


_TPU_SPLITS_AXES = ('TPU v5 lite', 'TPU v5e')   # where jax.make_mesh itself splits physical axes
_FIT_ERRORS = (NotImplementedError, ValueError, AssertionError)
_said = set()


def _slices(devices) -> list:
  """Devices grouped by TPU slice (one group off TPU or on a single slice)."""
  groups = {}
  for d in devices:
    groups.setdefault(getattr(d, 'slice_index', 0) or 0, []).append(d)
  return [groups[k] for k in sorted(groups)]


def _is_cuboid(devices) -> bool:
  """True when TPU devices fill a whole box of chip coordinates (a slice, not any subset)."""
  try:
    coords = [tuple(d.coords) for d in devices]
    cores = [int(d.core_on_chip) for d in devices]
  except (AttributeError, TypeError):
    return False
  lo = [min(c[i] for c in coords) for i in range(len(coords[0]))]
  hi = [max(c[i] for c in coords) for i in range(len(coords[0]))]
  box = math.prod(h - l + 1 for h, l in zip(hi, lo)) * (max(cores) - min(cores) + 1)
  return box == len(devices) == len(set(zip(coords, cores)))


def topology(devices) -> str:
  """'4x4x4 TPU v5p' for a TPU slice; the device count and kind elsewhere (for messages)."""
  devices = list(devices)
  kind = getattr(devices[0], 'device_kind', devices[0].platform)
  if devices[0].platform == 'tpu' and _is_cuboid(devices):
    coords = [tuple(d.coords) for d in devices]
    dims = [max(c[i] for c in coords) - min(c[i] for c in coords) + 1 for i in range(3)]
    while len(dims) > 2 and dims[-1] == 1:
      dims.pop()
    cores = len({d.core_on_chip for d in devices})
    n_slices = len(_slices(devices))
    shape = 'x'.join(map(str, dims)) + (f' x {cores} cores' if cores > 1 else '')
    return f'{n_slices} x {shape}' if n_slices > 1 else f'{shape} {kind}'
  return f'{len(devices)} x {kind}'


def device_grid(shape, devices):
  """Devices as an array of `shape` laid out on the physical topology; None if it does not fit.

  Not fitting only happens on TPU: a mesh axis that is not a product of whole physical axes
  (or, across slices, a `data` axis that is not a multiple of the slice count).
  """
  devices = list(devices)
  shape = tuple(int(s) for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f'mesh {shape} needs {math.prod(shape)} devices, got {len(devices)}.')
  if devices[0].platform != 'tpu':
    # CPU: the given order; GPU: sorted by id (process-major, so minor axes stay in a host).
    return mesh_utils.create_device_mesh(shape, devices)
  split = devices[0].device_kind in _TPU_SPLITS_AXES
  slices = _slices(devices)
  if not all(_is_cuboid(s) for s in slices) or len({len(s) for s in slices}) > 1:
    # An arbitrary subset of a slice (e.g. one device for sampling): no topology to follow.
    return np.asarray(devices, dtype=object).reshape(shape)
  try:
    if len(slices) > 1:
      if shape[0] % len(slices):
        return None
      ici = (shape[0] // len(slices),) + shape[1:]
      dcn = (len(slices),) + (1,) * (len(shape) - 1)
      return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                  allow_split_physical_axes=split)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
  except _FIT_ERRORS:
    return None


def valid_fsdp(devices, tensor: int = 1) -> list:
  """The mesh.fsdp values (data = the rest) this device set can lay out with mesh.tensor=tensor."""
  devices = list(devices)
  n = len(devices)
  if n % tensor:
    return []
  rest = n // tensor
  return [f for f in range(1, rest + 1)
          if rest % f == 0 and device_grid((rest // f, f, tensor), devices) is not None]


def _refit(config, shape, devices) -> tuple:
  """A shape that fits the TPU topology (config.mesh.data == -1: nearest fsdp), or ConfigError."""
  data, fsdp, tensor = shape
  where = topology(devices)
  fits = valid_fsdp(devices, tensor)
  if not fits:
    ok_tensor = [t for t in range(1, len(devices) + 1)
                 if len(devices) % t == 0 and valid_fsdp(devices, t)]
    raise ConfigError(
        f'mesh: tensor={tensor} cannot be laid out on this {where} slice (each mesh axis must be '
        f'a product of whole physical axes); valid mesh.tensor values here: {ok_tensor}.')
  if int(config.mesh.data) != -1 or int(config.mesh.fsdp) == -1:
    raise ConfigError(
        f'mesh (data={data}, fsdp={fsdp}, tensor={tensor}) cannot be laid out on this {where} '
        f'slice: each mesh axis must be a product of whole physical axes. Valid mesh.fsdp values '
        f'here with tensor={tensor}: {fits} (set mesh.data=-1 to take the rest).')
  larger = [f for f in fits if f >= fsdp]
  new = larger[0] if larger else fits[-1]
  new_shape = (len(devices) // (new * tensor), new, tensor)
  key = (shape, new_shape, where)
  if key not in _said:
    _said.add(key)
    from mars_jax import progress
    progress.say(f'mesh: fsdp={fsdp} does not fit the {where} slice (valid: '
                 f'{", ".join(map(str, fits))}); using fsdp={new}, data={new_shape[0]}. '
                 f'Set --config.mesh.fsdp={new} to choose it yourself.')
  return new_shape


def _process_of(grid: np.ndarray) -> np.ndarray:
  return np.vectorize(lambda d: getattr(d, 'process_index', 0), otypes=[int])(grid)


def _tensor_within_process(grid: np.ndarray) -> bool:
  procs = _process_of(grid)
  return not (procs != procs[:, :, :1]).any()


def _check_tensor_within_process(grid: np.ndarray):
  """Each process feeds its own batch rows, so a `tensor` group (same rows) must be one process."""
  if grid.shape[2] == 1 or _tensor_within_process(grid):
    return
  devices = list(grid.flat)
  per_proc = int(np.bincount(_process_of(grid).ravel()).max())
  ok = []
  for t in range(1, per_proc + 1):
    fits = valid_fsdp(devices, t) if len(devices) % t == 0 else []
    if any(_tensor_within_process(device_grid((len(devices) // (t * f), f, t), devices))
           for f in fits):
      ok.append(t)
  raise ConfigError(
      f'mesh.tensor={grid.shape[2]} spans processes on this {topology(devices)} slice, but a '
      f'tensor group holds the same batch rows and each process feeds its own rows '
      f'({per_proc} devices per process). mesh.tensor values that stay within a process here: '
      f'{ok}.')


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
