"""The CLI: config errors exit 2 naming the field, missing stages exit 3, stage order is fixed."""
import subprocess
import sys

import pytest

from mars_jax import config as config_lib
from mars_jax import main


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, '-m', 'mars_jax.main', *args], capture_output=True,
                        text=True, cwd=cwd, timeout=120)


def test_bad_override_exits_2_naming_the_field(tmp_path):
  r = _cli(f'--workdir={tmp_path}', '--config.cmx.factor=3', '--stages=prepare')
  assert r.returncode == 2
  assert 'cmx.factor=3' in r.stderr and 'valid factors' in r.stderr
  assert not (tmp_path / 'data').exists()  # nothing ran


def test_the_workdir_checks_run_under_python_m(tmp_path):
  """`python -m mars_jax.main` runs main.py as __main__; checking a training stage against the
  workdir must not import mars_jax.main a second time (its flags would be defined twice)."""
  r = _cli(f'--workdir={tmp_path}', '--stages=tokenizer')
  assert 'DuplicateFlagError' not in r.stderr
  assert r.returncode == 2 and 'add prepare to --stages' in r.stderr, r.stderr[-2000:]


def test_unknown_stage_is_rejected(tmp_path):
  r = _cli(f'--workdir={tmp_path}', '--stages=prepare,train')
  assert r.returncode == 2 and "unknown ['train']" in r.stderr


@pytest.mark.skipif(__import__('importlib').util.find_spec('gcsfs') is not None,
                    reason='gcsfs is installed: the real bucket would be contacted')
def test_bucket_workdir_without_gcsfs_exits_2_saying_what_to_install(tmp_path):
  r = _cli('--workdir=gs://some-bucket/run', '--stages=prepare', cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'gcsfs' in r.stderr and '.[gcs]' in r.stderr
  assert list(tmp_path.iterdir()) == []   # nothing written locally under a 'gs:' folder


def test_stages_run_in_pipeline_order():
  assert main.parse_stages(['sample', 'prepare', 'tokenizer']) == ['prepare', 'tokenizer', 'sample']
  with pytest.raises(config_lib.ConfigError):
    main.parse_stages(['bogus'])


@pytest.mark.parametrize('args, want', [
    (['--config=no_such_config.py'], 'no such file'),
    (['--config.sample.nmu=3'], 'Did you mean sample.num'),
    (['--config.tokenizer.trian.steps=3'], 'Did you mean tokenizer.train.steps'),
    (['--config.sample.num=-1'], 'sample.num=-1 must be a whole number >= 0'),
])
def test_config_mistakes_exit_2_without_a_traceback(tmp_path, args, want):
  r = _cli(f'--workdir={tmp_path / "w"}', '--stages=prepare', *args, cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert want in r.stderr and 'Traceback' not in r.stderr
  assert not (tmp_path / 'w').exists()
