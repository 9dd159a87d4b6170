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

from mars_jax.audio import librosa_loader  # noqa: E402
from tests.helpers import load_config, small_tiny_config  # noqa: E402


def pytest_configure(config):
  # librosa's numba cache is written here, once, before pytest-xdist starts its workers: test
  # modules import librosa directly, and two workers compiling it at once into an empty cache
  # can leave a gufunc that segfaults every later process (mars_jax/audio/librosa_loader.py).
  librosa_loader.load()
  config.addinivalue_line(
      'markers', 'multihost: multi-process jax.distributed tests (also slow; deselect: '
      '-m "not multihost")')
  config.addinivalue_line(
      'markers', 'slow: tests of ~10 s or more on a 2-core machine (the developer loop is '
      'python -m pytest -m "not slow", under 3 minutes; CI runs everything)')


# Fixtures that cost minutes: a test using one is slow whatever its own body costs.
SLOW_FIXTURES = ('trained_workdir',)


def pytest_collection_modifyitems(config, items):
  """Marks multi-process tests and users of a minutes-long fixture `slow`, so that
  -m "not slow" never pays for them."""
  for item in items:
    if item.get_closest_marker('multihost') or set(SLOW_FIXTURES) & set(item.fixturenames):
      item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """setup.cfg runs two pytest-xdist workers with `--dist loadfile`: a file's tests on one worker,
  so its module fixtures are built once. This keeps, in addition, every file that uses a
  minutes-long session fixture on one worker, so that fixture is built once, not once a worker.
  (xdist's own `loadgroup` would do this from marks, but it silently ignores them under pytest
  >= 9.2: pytest-dev/pytest-xdist#1386.)"""
  if config.getvalue('dist') != 'loadfile':
    return None
  from xdist.scheduler import LoadFileScheduling

  here = pathlib.Path(__file__).parent
  shared = {str(p.relative_to(config.rootpath)) for p in here.glob('test_*.py')
            if any(name in p.read_text() for name in SLOW_FIXTURES)}

  class FilesAndSharedFixtures(LoadFileScheduling):
    def _split_scope(self, nodeid):          # the extension point xdist's schedulers override
      path = super()._split_scope(nodeid)
      return '+'.join(SLOW_FIXTURES) if path in shared else path

  return FilesAndSharedFixtures(config, log)


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
