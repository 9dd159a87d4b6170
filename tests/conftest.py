"""Test setup: 8 simulated CPU devices, parsed absl flags (grain's mp_prefetch reads them).

XLA compiles without LLVM's optimisations (TEST_XLA_FLAGS): the suite's programs are tiny and its
time is mostly compiling, which this halves; the HLO, and so what every test checks, is the same.
"""
import os
import sys

TEST_XLA_FLAGS = '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
os.environ.setdefault('XLA_FLAGS', TEST_XLA_FLAGS)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import pathlib  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import load_config, small_tiny_config  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'multihost: multi-process jax.distributed tests (also slow; deselect: '
      '-m "not multihost")')
  config.addinivalue_line(
      'markers', 'slow: tests of ~10 s or more on a 2-core machine (the developer loop is '
      'python -m pytest -m "not slow", under 3 minutes; CI runs everything)')


# Fixtures that cost minutes: a test using one is slow whatever its own body costs.
SLOW_FIXTURES = ('trained_workdir',)


@pytest.hookimpl(tryfirst=True)     # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
  """Marks multi-process tests and users of a minutes-long fixture `slow`, so that
  -m "not slow" never pays for them.

  Groups the tests for pytest-xdist (setup.cfg runs two workers, `--dist loadgroup`): a file's
  tests stay on one worker, so its module fixtures are built once; the users of a minutes-long
  session fixture share one group, so it is built once, not once a worker."""
  for item in items:
    shared = sorted(set(SLOW_FIXTURES) & set(item.fixturenames))
    if item.get_closest_marker('multihost') or shared:
      item.add_marker(pytest.mark.slow)
    item.add_marker(pytest.mark.xdist_group('+'.join(shared) or item.path.stem))


@pytest.fixture
def tiny_config():
  return load_config('tiny')


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A workdir through prepare, tokenizer, autoregressor and sample on the cut-down tiny config.

  Shared by the stage tests (and the evaluation tests) so the pipeline trains once a session.
  It is trained at gs://mars-test/tiny on the offline stand-in for GCS (tests/fake_gcs.py): a
  write that bypasses mars_jax.fs (os.path on a URI, an append, a rename) would land elsewhere or
  fail, so the stage tests reading it also check the remote-workdir path. They get the local
  folder behind the bucket. Returns (local workdir, config).
  """
  from mars_jax import main
  from tests import fake_gcs
  root = tmp_path_factory.mktemp('bucket_root')
  config = small_tiny_config()
  with pytest.MonkeyPatch.context() as mp:
    seen = fake_gcs.use(root, mp)
    main.run(config, 'gs://mars-test/tiny',
             stages=('prepare', 'tokenizer', 'autoregressor', 'sample'))
  assert seen['orbax'] and all(p.startswith('gs://mars-test/tiny/') for p in seen['orbax'])
  assert seen['array_record']
  assert not pathlib.Path('gs:').exists(), 'something wrote gs://... through os paths'
  return str(root / 'mars-test' / 'tiny'), config
