"""Test setup: 8 simulated CPU devices, parsed absl flags (grain's mp_prefetch reads them)."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name='tiny'):
  """Loads configs/<name>.py the way the CLI does."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', ROOT / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture
def tiny_config():
  return load_config('tiny')
