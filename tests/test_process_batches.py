"""Batch sizes against the process count, without real processes: jax.process_count() and
process_index() are monkeypatched where the code reads them (#16 item 1)."""
import jax
import numpy as np
import pytest

from tests.helpers import load_config, quiet, small_synthetic_config

from mars_jax import workdir as workdir_lib
from mars_jax.config import ConfigError
from mars_jax.stages import prepare, tokenizer


def _processes(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


def test_tokenizer_eval_notes_are_the_same_on_8_and_16_processes(tmp_path, monkeypatch):
  """The held-out notes the tokenizer's evals decode (and show) go into a jit as one replicated
  input: every process must read the same ones, whatever the process count. (The first eval
  examples were a global batch split over the processes: refused on 8 or 16 hosts, and on 2 each
  process fed different rows to a jit as if replicated.)"""
  c = small_synthetic_config()
  prepare.run(c, str(tmp_path), log=quiet)
  ref_images, ref_midi = tokenizer._pitch_notes(c, str(tmp_path))
  assert len(ref_midi) >= 2
  for count in (2, 8, 16):
    for index in (0, count - 1):
      _processes(monkeypatch, index, count)
      images, midi = tokenizer._pitch_notes(c, str(tmp_path))
      np.testing.assert_array_equal(images, ref_images, err_msg=f'process {index}/{count}')
      np.testing.assert_array_equal(midi, ref_midi, err_msg=f'process {index}/{count}')


@pytest.mark.parametrize('hosts', [8, 16])
def test_large_config_on_v5p_hosts_passes_every_stage_check(tmp_path, hosts):
  """v5p-64 / v5p-128: 4 chips a host; every stage's batch splits over devices and processes."""
  workdir_lib.check_run(load_config('large'), str(tmp_path / 'new'), list(workdir_lib.FOLDERS),
                        num_devices=4 * hosts, num_processes=hosts)


@pytest.mark.parametrize('devices', [1, 4])
def test_classifier_batch_not_divisible_by_processes_is_refused_before_any_work(tmp_path,
                                                                                 devices):
  """128 processes and classifier.train.batch_size=64: refused up front, naming the field,
  instead of failing in evaluate after all the training."""
  c = load_config('large')
  if devices == 1:   # 1 device a process, tensor=4: the data-parallel size (32) divides 64
    c.mesh.fsdp, c.mesh.tensor = 8, 4
  with pytest.raises(ConfigError, match=r'classifier\.train\.batch_size=64'):
    workdir_lib.check_run(c, str(tmp_path / 'new'), ['prepare', 'evaluate'],
                          num_devices=128 * devices, num_processes=128)
