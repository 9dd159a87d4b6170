"""make_mesh on real slice topologies, with fake devices laid out like the real hardware.

jax's mesh utilities place a mesh on a TPU slice from each device's `coords` (its chip's position
in the ICI torus), `core_on_chip`, `device_kind` and `platform`; like jax's own mesh_utils tests,
these tests hand them plain objects carrying those fields, so a v5p-128 (4x4x4 torus, 16 hosts of
2x2x1 chips) or a v6e-256 (16x16) is checked here in milliseconds. Every row of launch/README.md's
slice table is built exactly as written, and configs/large.py (unchanged) is built on every slice
a launch script or README names.
"""
import dataclasses
import math
import os
import re

import jax
import pytest

from tests.helpers import load_config
from mars_jax.config import ConfigError, mesh_shape
from mars_jax.train import partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  platform: str
  device_kind: str
  process_index: int
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0
  slice_index: int = 0


# Physical topologies (Cloud TPU docs: v5p and v4 name TensorCores, 2 per chip, v5e/v6e chips).
_V5P = {8: (2, 2, 1), 16: (2, 2, 2), 32: (2, 2, 4), 64: (2, 4, 4), 128: (4, 4, 4), 256: (4, 4, 8),
        512: (4, 8, 8), 1024: (8, 8, 8)}
_2D = {8: (2, 4, 1), 16: (4, 4, 1), 32: (4, 8, 1), 64: (8, 8, 1), 128: (8, 16, 1),
       256: (16, 16, 1)}
KINDS = {'v5p': ('TPU v5p', _V5P), 'v4': ('TPU v4', _V5P), 'v6e': ('TPU v6 lite', _2D),
         'v5litepod': ('TPU v5 lite', _2D)}


def tpu_slice(accelerator: str, slice_index: int = 0, first_id: int = 0) -> list:
  """Devices of one slice, e.g. 'v5p-128': chips at every coordinate of the torus, one per chip
  (megacore), hosts of 2x2x1 chips (a whole 2x4 board for the single-host 8-chip v5e/v6e)."""
  family, n = accelerator.rsplit('-', 1)
  kind, table = KINDS[family]
  dims = table[int(n)]
  chips = math.prod(dims)
  host = (2, 4, 1) if chips == 8 and dims[2] == 1 else (2, 2, 1)
  host = tuple(min(h, d) for h, d in zip(host, dims))
  hosts_x, hosts_y = dims[0] // host[0], dims[1] // host[1]
  hosts_per_slice = chips // math.prod(host)
  out = []
  for z in range(dims[2]):
    for y in range(dims[1]):
      for x in range(dims[0]):
        proc = (z * hosts_y + y // host[1]) * hosts_x + x // host[0]
        out.append(FakeDevice(first_id + len(out), 'tpu', kind,
                              slice_index * hosts_per_slice + proc, (x, y, z), 0, slice_index))
  return out


def gpu_nodes(nodes: int, per_node: int) -> list:
  # jax numbers GPUs process-major; a shuffled list must still come back node-contiguous.
  devs = [FakeDevice(i, 'gpu', 'NVIDIA H100 80GB HBM3', i // per_node)
          for i in range(nodes * per_node)]
  return devs[::-1]


def _large(data=-1, fsdp=None, tensor=None):
  c = load_config('large')
  c.mesh.data = data
  if fsdp is not None:
    c.mesh.fsdp = fsdp
  if tensor is not None:
    c.mesh.tensor = tensor
  return c


def _readme_rows():
  with open(os.path.join(ROOT, 'launch', 'README.md')) as f:
    text = f.read()
  rows = []
  for line in text.splitlines():
    m = re.match(r'\|\s*(\S[^|]*?)\s*\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*\((\d+), (\d+), (\d+)\)\s*\|'
                 r'\s*(\d+) / (\d+)', line)
    if m:
      rows.append((m.group(1), int(m.group(2)), m.group(3),
                   tuple(int(m.group(i)) for i in (4, 5, 6)), int(m.group(7)), int(m.group(8))))
  return rows


def _devices_for(slice_name, chips):
  m = re.match(r'(\d+) x (\d+) \w+', slice_name)
  if m:   # '2 x 8 H100 (SLURM)'
    devs = gpu_nodes(int(m.group(1)), int(m.group(2)))
  else:
    devs = tpu_slice(slice_name)
  assert len(devs) == chips, slice_name
  return devs


ROWS = _readme_rows()


def test_readme_table_is_found():
  names = [r[0] for r in ROWS]
  assert {'v5p-64', 'v5p-128', 'v5p-512', 'v6e-256'} <= set(names), names
  assert any('SLURM' in n for n in names)


@pytest.mark.parametrize('row', ROWS, ids=[r[0] for r in ROWS])
def test_every_readme_row_builds_as_written(row):
  name, chips, topo, shape, tok_batch, var_batch = row
  devs = _devices_for(name, chips)
  if devs[0].platform == 'tpu':
    got = partitioning.topology(devs)
    assert got.startswith(topo + ' TPU'), (topo, got)
  data, fsdp, tensor = shape
  mesh = partitioning.make_mesh(_large(data=-1, fsdp=fsdp, tensor=tensor), devs)
  assert tuple(mesh.shape.values()) == shape
  # The same shape with data given explicitly builds too (no silent change of the row).
  mesh = partitioning.make_mesh(_large(data=data, fsdp=fsdp, tensor=tensor), devs)
  assert tuple(mesh.shape.values()) == shape
  hosts = len({d.process_index for d in devs})
  for batch in (tok_batch, var_batch):
    assert batch % (data * fsdp) == 0 and batch % hosts == 0, (name, batch)


@pytest.mark.parametrize('accelerator', ['v5p-16', 'v5p-32', 'v5p-64', 'v5p-128', 'v5p-256',
                                         'v5p-512', 'v5p-1024', 'v4-32', 'v4-128', 'v6e-8',
                                         'v6e-16', 'v6e-64', 'v6e-256', 'v5litepod-256'])
def test_large_config_builds_on_every_slice(accelerator, monkeypatch):
  """configs/large.py as shipped (fsdp=8, data=-1), with the default device list (jax.devices())."""
  devs = tpu_slice(accelerator)
  monkeypatch.setattr(jax, 'devices', lambda *a: list(devs))
  mesh = partitioning.make_mesh(load_config('large'))
  assert math.prod(mesh.shape.values()) == len(devs)
  assert mesh.shape['tensor'] == 1
  assert mesh.shape['fsdp'] >= 8 or mesh.shape['fsdp'] * mesh.shape['data'] < 8
  # Devices sit on the torus: each fsdp group covers whole physical axes (a sub-box of chips).
  grid = mesh.devices
  for i in range(grid.shape[0]):
    group = grid[i, :, 0]
    coords = [d.coords for d in group]
    box = math.prod(max(c[k] for c in coords) - min(c[k] for c in coords) + 1 for k in range(3))
    assert box == len(group), (accelerator, dict(mesh.shape))


def test_v5p_128_fsdp_8_is_refit_to_16_and_says_so(capsys):
  devs = tpu_slice('v5p-128')
  # jax's own make_mesh cannot do it: fsdp=8 is not a product of 4x4x4's axes.
  from jax.experimental import mesh_utils
  with pytest.raises(NotImplementedError):
    mesh_utils.create_device_mesh((8, 8, 1), devs)
  partitioning._said.clear()
  mesh = partitioning.make_mesh(_large(), devs)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 16, 'tensor': 1}
  out = capsys.readouterr().out
  assert 'fsdp=8 does not fit the 4x4x4 TPU v5p slice (valid: 1, 4, 16, 64)' in out
  assert '--config.mesh.fsdp=16' in out
  assert partitioning.valid_fsdp(devs) == [1, 4, 16, 64]


def test_fixed_data_that_cannot_fit_names_mesh_fsdp_and_the_choices():
  devs = tpu_slice('v5p-128')
  with pytest.raises(ConfigError, match=r'Valid mesh.fsdp values here with tensor=1: '
                                        r'\[1, 4, 16, 64\]'):
    partitioning.make_mesh(_large(data=8, fsdp=8, tensor=1), devs)
  with pytest.raises(ConfigError, match=r'mesh: tensor=2 cannot be laid out on this 4x4x4 TPU v5p '
                                        r'slice.*valid mesh.tensor values here: \[1, 4, 16, 64\]'):
    partitioning.make_mesh(_large(tensor=2), devs)


def test_tensor_axis_spanning_hosts_is_refused():
  # v5p-128 tensor=4 lies along a 4-chip physical axis, which crosses 2x2x1-chip hosts.
  devs = tpu_slice('v5p-128')
  with pytest.raises(ConfigError, match=r'mesh.tensor=4 spans processes.*4 devices per process'):
    partitioning.make_mesh(_large(fsdp=4, tensor=4), devs)
  # On GPUs a tensor group within a node is fine, across nodes is not.
  mesh = partitioning.make_mesh(_large(fsdp=4, tensor=2), gpu_nodes(2, 8))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 2}
  with pytest.raises(ConfigError, match=r'values that stay within a process here: \[1, 2, 4, 8\]'):
    partitioning.make_mesh(_large(data=1, fsdp=1, tensor=16), gpu_nodes(2, 8))


def test_gpu_mesh_keeps_fsdp_within_a_node():
  mesh = partitioning.make_mesh(_large(fsdp=8), gpu_nodes(2, 8))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 8, 'tensor': 1}
  for i in range(2):
    assert {d.process_index for d in mesh.devices[i, :, 0]} == {i}


def test_two_slices_put_data_across_slices():
  devs = tpu_slice('v5p-128', 0) + tpu_slice('v5p-128', 1, first_id=64)
  partitioning._said.clear()
  mesh = partitioning.make_mesh(_large(), devs)
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 16, 'tensor': 1}
  # The first half of `data` is slice 0, the second half slice 1: fsdp never crosses DCN.
  for i in range(8):
    assert {d.slice_index for d in mesh.devices[i].ravel()} == {i // 4}


def test_cpu_and_subsets_keep_the_given_order():
  cpus = jax.devices()
  c = _large(data=-1, fsdp=2, tensor=1)
  mesh = partitioning.make_mesh(c, cpus)
  assert list(mesh.devices.ravel()) == list(cpus)
  assert dict(mesh.shape) == {'data': len(cpus) // 2, 'fsdp': 2, 'tensor': 1}
  # One device of a big slice (the sampler's mesh) is not a slice: no topology, no error.
  one = tpu_slice('v5p-128')[5:6]
  c1 = _large(data=1, fsdp=1, tensor=1)
  assert partitioning.make_mesh(c1, one).devices.ravel().tolist() == one
  assert mesh_shape(c1, 1) == {'data': 1, 'fsdp': 1, 'tensor': 1}
