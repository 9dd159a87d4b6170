"""mars_jax.fs: workdir files that behave the same in a local folder and in a bucket (gs://).

The bucket is tests/fake_gcs.py (no append, no rename, like GCS). The whole tiny pipeline already
trains in it (conftest.trained_workdir); these tests pin the pieces.
"""
import os
import pathlib

import numpy as np
import pytest

from tests import fake_gcs
from mars_jax import fs


def test_uris_survive_path_handling():
  assert fs.absolute('gs://b/run') == 'gs://b/run'          # os.path.abspath would mangle it
  assert fs.join('gs://b/run', 'data', 'manifest.json') == 'gs://b/run/data/manifest.json'
  assert fs.absolute('rel/x') == os.path.join(os.getcwd(), 'rel', 'x')
  assert fs.is_remote('gs://b') and not fs.is_remote('/tmp/gs')


def test_local_write_is_whole_or_nothing(tmp_path, monkeypatch):
  p = tmp_path / 'm.json'
  fs.write_text(p, 'old')
  def broken_fsync(fd):
    raise OSError('disk full')
  monkeypatch.setattr(os, 'fsync', broken_fsync)
  with pytest.raises(OSError, match='disk full'):
    fs.write_text(p, 'new')
  assert p.read_text() == 'old'                              # the old file, intact
  assert sorted(os.listdir(tmp_path)) == ['m.json']          # and no temp file left behind


def test_bucket_round_trip_without_append_or_rename(tmp_path, monkeypatch):
  fake_gcs.use(tmp_path, monkeypatch)
  fs.write_text('gs://b/run/config.json', '{}')              # parents need no mkdir on GCS
  assert fs.read_text('gs://b/run/config.json') == '{}'
  assert (tmp_path / 'b' / 'run' / 'config.json').read_text() == '{}'
  with pytest.raises(NotImplementedError):                   # the stand-in refuses appends
    fs.path('gs://b/run/config.json').open('a')
  src = tmp_path / 'local.bin'
  src.write_bytes(b'x' * 100)
  fs.upload(str(src), 'gs://b/run/data/shard')
  assert fs.path('gs://b/run/data/shard').stat().length == 100 and not src.exists()
  assert [p.name for p in fs.path('gs://b/run').iterdir()] == ['config.json', 'data']


class FakeClock:
  """A monotonic clock the test moves by hand (a freshly booted machine reads a few seconds)."""

  def __init__(self, now=5.0):
    self.now = now

  def __call__(self):
    return self.now


@pytest.mark.parametrize('uptime_s', [5.0, 10 * 86400.0])
def test_append_log_in_a_bucket_uploads_whole_and_reopens(tmp_path, monkeypatch, uptime_s):
  """Whatever the machine's uptime (seconds after boot or days), the first flush uploads."""
  fake_gcs.use(tmp_path, monkeypatch)
  clock = FakeClock(uptime_s)
  monkeypatch.setattr(fs.time, 'monotonic', clock)   # also the default clock
  obj = tmp_path / 'b' / 'm.jsonl'
  log = fs.AppendLog('gs://b/m.jsonl', remote_every_s=3600)
  log.write('1\n')
  log.flush()                        # the first flush uploads
  assert obj.read_text() == '1\n'
  log.write('2\n')
  clock.now += 10
  log.flush()                        # within remote_every_s: not yet
  assert obj.read_text() == '1\n'
  log.flush(force=True)              # checkpoint time
  assert obj.read_text() == '1\n2\n'
  log.write('3\n')
  clock.now += 3600
  log.flush()                        # remote_every_s has passed: uploads
  assert obj.read_text() == '1\n2\n3\n'
  log.write('4\n')
  log.close()                        # close always uploads
  assert obj.read_text() == '1\n2\n3\n4\n'
  again = fs.AppendLog('gs://b/m.jsonl')   # a restarted run continues the object
  again.write('5\n')
  again.close()
  assert obj.read_text() == '1\n2\n3\n4\n5\n'


def test_append_log_clock_is_injectable(tmp_path, monkeypatch):
  fake_gcs.use(tmp_path, monkeypatch)
  clock = FakeClock(0.5)
  obj = tmp_path / 'b' / 'e.bin'
  log = fs.AppendLog('gs://b/e.bin', binary=True, remote_every_s=30, clock=clock)
  log.write(b'a')
  log.flush()
  assert obj.read_bytes() == b'a'
  log.write(b'b')
  clock.now = 30.4
  log.flush()
  assert obj.read_bytes() == b'a'
  clock.now = 30.5
  log.flush()
  assert obj.read_bytes() == b'ab'


def test_local_append_log_appends(tmp_path):
  p = tmp_path / 'm.jsonl'
  p.write_text('1\n')
  log = fs.AppendLog(p, binary=True)
  log.write(b'2\n')
  log.flush()
  assert p.read_text() == '1\n2\n'
  log.close()


@pytest.mark.skipif(__import__('importlib').util.find_spec('gcsfs') is not None,
                    reason='gcsfs is installed: the real bucket would be contacted')
def test_gs_workdir_without_gcsfs_says_what_to_install():
  with pytest.raises(fs.WorkdirError, match=r'gcsfs.*pip install -e "\.\[gcs\]"'):
    fs.check_workdir('gs://some-bucket/run')


def test_evaluate_reads_the_bucket_as_the_folder(trained_workdir, monkeypatch):
  """The trained workdir lives in the stand-in bucket: the evaluate stage's readers see the same
  curves, samples and waves through gs:// as through the local folder behind it."""
  from mars_jax.data import pipeline
  from mars_jax.evaluate import report
  from mars_jax.stages import evaluate
  local, config = trained_workdir
  fake_gcs.use(pathlib.Path(local).parents[1], monkeypatch)
  remote = 'gs://mars-test/tiny'
  assert report.load_curves(remote) == report.load_curves(local)
  assert set(report.load_curves(remote)) >= {'tokenizer', 'autoregressor'}
  vocab = pipeline.load_manifest(fs.join(remote, 'data'))['vocab']
  entries, pitch, inst = evaluate.load_samples(config, remote, vocab)
  entries_l, pitch_l, inst_l = evaluate.load_samples(config, local, vocab)
  assert entries == entries_l
  np.testing.assert_array_equal(pitch, pitch_l)
  np.testing.assert_array_equal(inst, inst_l)
  waves, bad = evaluate.load_waves(config, remote, entries)
  waves_l, bad_l = evaluate.load_waves(config, local, entries)
  assert bad == bad_l == 0
  np.testing.assert_array_equal(waves, waves_l)
  assert evaluate._samples_hash(remote) == evaluate._samples_hash(local) != 'none'
