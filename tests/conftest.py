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
sys.path.insert(0, str(ROOT / 'tests'))   # helper modules: fake_gcs, multihost_driver


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'multihost: multi-process jax.distributed tests (slow; deselect: -m "not multihost")')
  config.addinivalue_line(
      'markers', 'slow: tests of a minute or more (deselect: -m "not slow"; CI runs them)')


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


def small_tiny_config(**overrides):
  """The tiny config cut down for tests: fewer notes, few steps, frequent evals."""
  c = load_config('tiny')
  c.data.synthetic.per_pitch_family = 2
  c.data.prepare_workers = 1
  for stage in ('tokenizer', 'autoregressor'):
    t = c[stage].train
    t.steps, t.batch_size, t.log_every, t.eval_every, t.checkpoint_every = 30, 16, 5, 10, 10
    t.warmup_steps = 3
  c.autoregressor.train.lr = 3e-3
  c.tokenizer.channels, c.tokenizer.groups = 16, 4
  c.autoregressor.depth, c.autoregressor.width, c.autoregressor.heads = 2, 64, 2
  c.sample.num, c.sample.batch_size = 8, 8
  for k, v in overrides.items():
    section, *rest = k.split('__')
    node = c[section]
    for r in rest[:-1]:
      node = node[r]
    node[rest[-1]] = v
  return c


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A workdir through prepare, tokenizer, autoregressor and sample on the cut-down tiny config.

  Shared by the stage tests (and the evaluation tests) so the pipeline trains once a session.
  It is trained at gs://mars-test/tiny on the offline stand-in for GCS (tests/fake_gcs.py): a
  write that bypasses mars_jax.fs (os.path on a URI, an append, a rename) would land elsewhere or
  fail, so the stage tests reading it also check the remote-workdir path. They get the local
  folder behind the bucket. Returns (local workdir, config).
  """
  import fake_gcs
  from mars_jax import main
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
