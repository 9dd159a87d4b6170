"""Issue #13: a refused run changes nothing, the API stays within memory and validates its
arguments, damaged files are found and redone, one process a workdir."""
import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from tests.helpers import quiet, small_synthetic_config, small_tiny_config
from mars_jax import config as config_lib
from mars_jax import main


def _tree(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture
def workdir_copy(trained_workdir, tmp_path):
  """A private copy of the trained workdir (local folder) that a test may damage."""
  local, config = trained_workdir
  dst = tmp_path / 'w'
  shutil.copytree(local, dst, ignore=shutil.ignore_patterns('.xla_cache'))
  return str(dst), config


def _changed(config, **fields):
  c = config.copy_and_resolve_references()
  for dotted, v in fields.items():
    *path, last = dotted.split('__')
    node = c
    for k in path:
      node = node[k]
    node[last] = v
  return c


def _folder_config(tmp_path, rows):
  """The tiny config on a folder source at tmp_path/corpus whose labels.csv holds `rows`."""
  from tests.helpers import load_config
  root = tmp_path / 'corpus'
  root.mkdir()
  (root / 'labels.csv').write_text('file,pitch,instrument,split\n' + rows)
  c = load_config('tiny')
  c.data.source, c.data.path, c.data.prepare_workers = 'folder', str(root), 1
  return c


# --- bug 1: a refused run never changes the workdir --------------------------------------------

@pytest.mark.parametrize('stages', [('prepare', 'tokenizer', 'autoregressor', 'sample'),
                                    ('prepare',)])
def test_a_refused_run_changes_nothing(workdir_copy, stages):
  """Another pitch range on a trained workdir: refused before config.json or data/ change."""
  w, config = workdir_copy
  before = _tree(w)
  other = _changed(config, data__pitch_range=(49, 72))
  with pytest.raises(config_lib.ConfigError) as e:
    main.run(other, w, stages=stages, out=quiet)
  msg = str(e.value)
  assert 'new --workdir' in msg and '--force' in msg and 'tokenizer' in msg
  assert _tree(w) == before                      # config.json, data/, checkpoints: untouched
  assert json.loads(pathlib.Path(w, 'config.json').read_text())['data']['pitch_range'] == [48, 71]


def test_a_stage_without_its_input_is_refused_before_config_json(workdir_copy):
  """--stages=sample with another autoregressor config: its model is not in the workdir."""
  w, config = workdir_copy
  before = _tree(w)
  other = _changed(config, autoregressor__depth=3, autoregressor__heads=3,
                   autoregressor__width=48)
  with pytest.raises(config_lib.ConfigError, match='needs the autoregressor stage'):
    main.run(other, w, stages=('sample',), out=quiet)
  assert _tree(w) == before


def test_force_says_what_it_deletes_then_runs(workdir_copy):
  w, config = workdir_copy
  other = _changed(config, data__pitch_range=(49, 72))
  said = []
  main.run(other, w, stages=('prepare',), force=True, out=lambda *a, **k: said.append(' '.join(
      map(str, a))))
  text = '\n'.join(said)
  for gone in ('tokenizer', 'autoregressor', 'samples'):
    assert f'--force: deleting {os.path.join(w, gone)}' in text
    assert not os.path.exists(os.path.join(w, gone))
  assert json.loads(pathlib.Path(w, 'config.json').read_text())['data']['pitch_range'] == [49, 72]
  from mars_jax.stages import prepare
  assert prepare.is_complete(other, w)


def test_prepare_alone_never_replaces_data_under_checkpoints(workdir_copy):
  """The stage itself refuses too (a direct call, without the CLI's check)."""
  from mars_jax.stages import prepare
  w, config = workdir_copy
  before = _tree(w)
  with pytest.raises(config_lib.ConfigError, match='checkpoints'):
    prepare.run(_changed(config, data__pitch_range=(49, 72)), w, log=quiet)
  assert _tree(w) == before


def test_generator_refuses_parts_of_different_configs(workdir_copy):
  from mars_jax.sample import Generator
  w, config = workdir_copy
  cfg_path = pathlib.Path(w, 'config.json')
  good = cfg_path.read_text()
  bad = json.loads(good)
  bad['data']['pitch_range'] = [49, 72]          # what the bug left behind: a config.json of
  cfg_path.write_text(json.dumps(bad))           # another run over the trained models
  with pytest.raises(config_lib.ConfigError, match='tokenizer.*autoregressor|belong'):
    Generator.from_workdir(w)
  cfg_path.write_text(good)
  m_path = pathlib.Path(w, 'data', 'manifest.json')
  m = json.loads(m_path.read_text())
  m['config_hash'] = '0123456789abcdef'           # data re-prepared for another config
  m_path.write_text(json.dumps(m))
  with pytest.raises(config_lib.ConfigError, match='data'):
    Generator.from_workdir(w)


def test_batch_versus_devices_is_checked_before_prepare(tmp_path):
  c = small_tiny_config()
  c.tokenizer.train.batch_size = 12               # 8 simulated devices (conftest)
  with pytest.raises(config_lib.ConfigError, match='tokenizer.train.batch_size=12'):
    main.run(c, str(tmp_path / 'w'), stages=('prepare', 'tokenizer'), out=quiet)
  assert not (tmp_path / 'w').exists()


# --- bug 2: generate(n) in fixed-size batches ---------------------------------------------------

@pytest.fixture(scope='module')
def generator(trained_workdir):
  from mars_jax.sample import Generator
  return Generator.from_workdir(trained_workdir[0])


def _with_batch(gen, batch_size):
  """The same trained model with another sample.batch_size."""
  import ml_collections
  from mars_jax.sample import Generator
  c = ml_collections.ConfigDict(gen.config.to_dict())
  c.sample.batch_size = batch_size
  manifest = {'vocab': {gen.config.data.instrument_label: gen.instruments}}
  return Generator(c, manifest, gen.tokenizer, gen.tokenizer_params, gen.var,
                   gen.var_params)


class _Recorder:
  """Wraps a jitted function, recording the batch size of each call."""

  def __init__(self, fn, arg):
    self.fn, self.arg, self.batches = fn, arg, []

  def __call__(self, *a):
    self.batches.append(a[self.arg].shape[0])
    return self.fn(*a)


def test_generate_runs_in_batches_of_sample_batch_size(generator):
  g = _with_batch(generator, 3)
  g.spectrogram_fn = spec = _Recorder(g.spectrogram_fn, 2)
  g.audio_fn = audio = _Recorder(g.audio_fn, 0)
  waves = g.generate(pitch=60, instrument='flute', n=7, seed=2)
  assert waves.shape == (7, g.shapes.n_samples)
  assert spec.batches == [3, 3, 3] and audio.batches == [3, 3, 3]   # the last one padded
  g.generate(pitch=61, instrument='brass', n=4, seed=0)
  g.spectrograms([60, 62], ['flute', 'organ'], [0, 1])
  assert set(spec.batches) == {3}          # one program shape whatever n: compiled once


def test_batching_does_not_change_the_notes(generator):
  """generate(n) with batch size 3 equals one batch of n, draw for draw."""
  small, big = _with_batch(generator, 3), _with_batch(generator, 7)
  a = small.spectrograms([60, 61, 62, 63, 64, 65, 66], ['flute', 'brass'] * 3 + ['organ'],
                         range(10, 17))
  b = big.spectrograms([60, 61, 62, 63, 64, 65, 66], ['flute', 'brass'] * 3 + ['organ'],
                       range(10, 17))
  np.testing.assert_allclose(a, b, atol=1e-5)
  wa = small.generate(pitch=60, instrument='guitar', n=7, seed=4)
  wb = big.generate(pitch=60, instrument='guitar', n=7, seed=4)
  np.testing.assert_allclose(wa, wb, atol=1e-4)
  # and a note depends on its own seed only: note 5 of the run is note 0 of a run from seed 9
  np.testing.assert_allclose(wa[5:], small.generate(pitch=60, instrument='guitar', n=2, seed=9),
                             atol=1e-4)


# --- API validation -----------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    (dict(n=-1), r'n=-1.*whole number >= 0'),
    (dict(n=2.5), r'n=2.5.*whole number'),
    (dict(pitch=60.7), r'pitch=60.7.*whole MIDI'),
    (dict(pitch=float('nan')), r'pitch=nan.*whole MIDI'),
    (dict(cfg=float('nan')), r'cfg=nan.*finite'),
    (dict(cfg=float('inf')), r'cfg=inf.*finite'),
    (dict(top_p=float('nan')), r'top_p=nan.*\[0, 1\]'),
    (dict(top_p=1.5), r'top_p=1.5.*\[0, 1\]'),
    (dict(top_p=-0.1), r'top_p=-0.1.*\[0, 1\]'),
    (dict(top_k=-1), r'top_k=-1.*whole number >= 0'),
    (dict(seed=-3), r'seed=-3.*0\.\.'),
])
def test_api_arguments_are_checked(generator, kwargs, match):
  with pytest.raises(ValueError, match=match):
    generator.generate(**{'pitch': 60, 'instrument': 'flute', 'n': 1, **kwargs})


def test_api_accepts_whole_floats_and_numpy_ints(generator):
  assert generator.check(60.0, 'flute') == generator.check(np.int64(60), 'flute')
  assert generator.generate(pitch=60, instrument='flute', n=0).shape == (0,
                                                                         generator.shapes.n_samples)


@pytest.mark.parametrize('field, value, match', [
    ('num', -1, 'sample.num=-1'), ('batch_size', 0, 'sample.batch_size=0'),
    ('cfg', float('nan'), 'sample.cfg=nan'), ('top_p', 1.5, 'sample.top_p=1.5'),
    ('top_k', -1, 'sample.top_k=-1')])
def test_sample_section_is_validated(field, value, match):
  c = small_tiny_config()
  c.sample[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.derive(c)


# --- bug 3: instrument names are not paths ------------------------------------------------------

class _FakeGenerator:
  """Stands in for a trained model whose vocabulary has hostile instrument names."""
  instruments = ['brass/acoustic', '../../escape', 'a b\\c', '']
  pitches = [60, 61]
  sample_rate = 8000

  def __init__(self, n_samples):
    self.n = n_samples

  def spectrograms(self, pitches, instruments, seeds, *a):
    return np.zeros((len(pitches), 4, 4), np.float32)

  def audio(self, spec):
    return np.zeros((len(spec), self.n), np.float32)


def test_sample_file_names_are_slugs_and_samples_json_keeps_the_names(tmp_path, monkeypatch):
  from mars_jax import workdir as workdir_lib
  from mars_jax.stages import sample as sample_stage
  c = small_tiny_config()
  c.sample.num = 0                              # the whole grid: every name
  shapes = config_lib.derive(c)
  complete = workdir_lib.complete   # a trained autoregressor, as far as the sample stage asks
  monkeypatch.setattr(workdir_lib, 'complete',
                      lambda cfg, w, stage: stage == 'autoregressor' or complete(cfg, w, stage))
  monkeypatch.setattr(sample_stage.Generator, 'from_workdir',
                      staticmethod(lambda *a, **k: _FakeGenerator(shapes.n_samples)))
  w = tmp_path / 'w'
  sample_stage.run(c, str(w))
  sdir = w / 'samples'
  entries = json.loads((sdir / 'samples.json').read_text())
  assert sorted({e['instrument'] for e in entries}) == sorted(_FakeGenerator.instruments)
  for e in entries:
    assert '/' not in e['file'] and '\\' not in e['file'] and '..' not in e['file']
    assert ' ' not in e['file'] and (sdir / e['file']).is_file()
  assert sorted(p.name for p in w.iterdir()) == ['samples']     # nothing escaped the folder
  assert len({e['file'] for e in entries}) == len(entries)
  assert all(p.is_file() for p in sdir.iterdir())


def test_prepare_checks_label_vocabularies(tmp_path):
  import soundfile as sf
  from mars_jax.data import pipeline
  from mars_jax.stages import prepare
  tone = (0.5 * np.sin(2 * np.pi * 330 * np.arange(8192) / 8000)).astype(np.float32)
  c = _folder_config(tmp_path, 'a.wav,64,ok,train\nb.wav,64,"tab\there",train\n')
  for f in ('a.wav', 'b.wav'):
    sf.write(os.path.join(c.data.path, f), tone, 8000)
  with pytest.raises(pipeline.DataError, match=r"instrument.*'tab\\there'.*control"):
    prepare.run(c, str(tmp_path / 'work'), log=quiet)
  assert not (tmp_path / 'work' / 'data').exists()


# --- bug 4: a damaged checkpoint is found, skipped and redone -----------------------------------

def _steps(stage_dir):
  return sorted(int(x) for x in os.listdir(os.path.join(stage_dir, 'checkpoints')) if x.isdigit())


def _truncate(stage_dir, step):
  """Cuts every file of one checkpoint step to half its size."""
  for dirpath, _, files in os.walk(os.path.join(stage_dir, 'checkpoints', str(step))):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, 'r+b') as fh:
        fh.truncate(os.path.getsize(p) // 2)


def test_damaged_final_checkpoint_is_not_complete_and_the_previous_loads(workdir_copy, caplog):
  import logging
  from mars_jax.sample import Generator
  from mars_jax.stages import tokenizer as tok_stage
  w, config = workdir_copy
  tdir = os.path.join(w, 'tokenizer')
  assert tok_stage.is_complete(config, w)
  last = _steps(tdir)[-1]
  _truncate(tdir, last)
  assert not tok_stage.is_complete(config, w)       # "complete" = the final checkpoint is intact
  with caplog.at_level(logging.WARNING):
    gen = Generator.from_workdir(w)
  assert f'step {last} in {os.path.join(tdir, "checkpoints")} is damaged' in caplog.text
  assert gen.generate(pitch=60, instrument='flute', n=1).shape == (1, gen.shapes.n_samples)


def test_no_intact_checkpoint_names_the_folder(workdir_copy):
  from mars_jax.sample import Generator
  from mars_jax.train import checkpoint
  w, _ = workdir_copy
  tdir = os.path.join(w, 'tokenizer')
  for s in _steps(tdir):
    _truncate(tdir, s)
  with pytest.raises(checkpoint.CheckpointError,
                     match=f'no intact checkpoint in {os.path.join(tdir, "checkpoints")}: step'):
    Generator.from_workdir(w)


def test_rerun_retrains_from_the_newest_intact_checkpoint(workdir_copy, capsys, caplog):
  import logging
  from mars_jax.sample import Generator
  from mars_jax.stages import tokenizer as tok_stage
  w, config = workdir_copy
  tdir = os.path.join(w, 'tokenizer')
  import jax
  before = jax.device_get(Generator.from_workdir(w).tokenizer_params)
  steps = _steps(tdir)
  _truncate(tdir, steps[-1])
  with caplog.at_level(logging.WARNING):
    main.run(config, w, stages=('tokenizer',))
  out = capsys.readouterr().out
  assert '[tokenizer] starting' in out and 'final checkpoint is damaged' in out
  assert f'resuming from step {steps[-2]}; damaged step {steps[-1]} moved to' in caplog.text
  assert tok_stage.is_complete(config, w) and _steps(tdir) == steps
  assert len(os.listdir(os.path.join(tdir, 'checkpoints-damaged'))) == 1   # set aside, not lost
  after = jax.device_get(Generator.from_workdir(w).tokenizer_params)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)            # a rerun trains to the same model


def test_only_damage_counts_as_damage(workdir_copy):
  """verify() passes intact steps, catches truncated array data behind intact JSON, and a
  target that does not fit an intact checkpoint is an error of its own, never 'damaged' (no
  good checkpoint is ever skipped or set aside for it)."""
  import jax
  from mars_jax.train import checkpoint
  w, _ = workdir_copy
  tdir = os.path.join(w, 'tokenizer')
  ck = os.path.join(tdir, 'checkpoints')
  steps = _steps(tdir)
  assert all(checkpoint.verify(ck, s) is None for s in steps)
  data = os.path.join(ck, str(steps[-1]), 'state', 'ocdbt.process_0', 'd')
  for f in os.listdir(data):                                # the array data only (some of
    with open(os.path.join(data, f), 'r+b') as fh:          # these files hold bytes no array
      fh.truncate(os.path.getsize(os.path.join(data, f)) // 2)   # refers to)
  assert checkpoint.check_files(ck, steps[-1]) is None      # JSON intact, sizes not recorded
  assert 'Error reading' in checkpoint.verify(ck, steps[-1])
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ckptr:               # the params as stored, every shape + 1:
    meta = ckptr.metadata(os.path.join(ck, str(steps[0]), 'state')).item_metadata.tree
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])   # a model of another size
  wrong = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(d + 1 for d in m.shape), m.dtype,
                                                      sharding=sharding), meta['params'])
  with pytest.raises(ValueError, match='not compatible with the stored shape') as e:
    checkpoint.restore_params(ck, wrong, step=steps[0], ema=False)
  assert not isinstance(e.value, checkpoint.CheckpointError)
  assert _steps(tdir) == steps and not os.path.exists(ck + '-damaged')


# --- bug 5: a damaged data shard is found and redone --------------------------------------------

def test_truncated_shard_is_not_prepared_and_is_redone(tmp_path):
  from mars_jax.data import pipeline
  from mars_jax.stages import prepare
  c, w = small_synthetic_config(), str(tmp_path / 'w')
  m = prepare.run(c, w, log=quiet)
  ddir = pathlib.Path(w, 'data')
  shard = ddir / m['splits']['train']['shards'][0]
  good = shard.read_bytes()
  shard.write_bytes(good[:len(good) // 2])
  assert not prepare.is_complete(c, w)
  with pytest.raises(pipeline.DataError, match=f'{shard.name} has .* bytes.*truncated'):
    pipeline.make_iterator(c, str(ddir), 'train', batch_size=4)
  n_shards = sum(len(v['shards']) for v in m['splits'].values())
  said = []
  prepare.run(c, w, log=said.append)
  assert any(f'({n_shards - 1} reused)' in s for s in said), said   # only the damaged one redone
  assert shard.read_bytes() == good and prepare.is_complete(c, w)


def test_a_split_that_ends_up_empty_is_an_error(tmp_path):
  from mars_jax.data import pipeline
  from mars_jax.stages import prepare
  c = _folder_config(tmp_path, 'gone1.wav,64,a,train\ngone2.wav,65,a,train\n')
  with pytest.raises(pipeline.DataError, match=r"split 'train' ends up empty: 2 notes listed"):
    prepare.run(c, str(tmp_path / 'w'), log=quiet)
  assert not prepare.is_complete(c, str(tmp_path / 'w'))


# --- bug 6: one run a workdir -------------------------------------------------------------------

def _lock_info(pid, host=None, age_s=0.0, beat_age_s=None):
  import socket
  import time
  from mars_jax import workdir
  now = time.time()
  return {'pid': pid, 'host': host or socket.gethostname(), 'started': now - age_s,
          'heartbeat': now - (age_s if beat_age_s is None else beat_age_s),
          'proc_start': workdir._proc_start(pid), 'command': 'python -m mars_jax.main (other)',
          'token': 'other'}


def test_a_workdir_in_use_is_refused_naming_the_holder(tmp_path):
  import socket
  import subprocess
  import sys
  w = tmp_path / 'w'
  w.mkdir()
  c = small_tiny_config()
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
  try:
    (w / '.lock').write_text(json.dumps(_lock_info(holder.pid, age_s=5)))
    with pytest.raises(Exception, match=rf'in use by another run: pid {holder.pid} on host '
                                        rf'{socket.gethostname()}, started 20\d\d-') as e:
      main.run(c, str(w), stages=('prepare',), out=quiet)
    from mars_jax import fs
    assert isinstance(e.value, fs.WorkdirError)          # the CLI: 'error: ...', exit 2
    assert sorted(os.listdir(w)) == ['.lock']            # nothing else written
  finally:
    holder.kill()
    holder.wait()
  said = []                                              # its holder is dead: a stale lock
  main.run(c, str(w), stages=('prepare',), out=said.append)
  assert any('replacing a stale lock' in s and 'no longer running' in s for s in said), said
  assert not (w / '.lock').exists()                      # released at the end
  assert (w / 'data' / 'manifest.json').exists()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
  from mars_jax import workdir
  w = tmp_path / 'w'
  w.mkdir()
  (w / '.lock').write_text(json.dumps(_lock_info(1, host='tpu-vm-7', age_s=3600, beat_age_s=30)))
  with pytest.raises(workdir.WorkdirLocked, match='pid 1 on host tpu-vm-7'):
    workdir.Lock(str(w), quiet).acquire()
  (w / '.lock').write_text(json.dumps(_lock_info(1, host='tpu-vm-7', age_s=3600,
                                                 beat_age_s=workdir.STALE_S + 60)))
  said = []
  lock = workdir.Lock(str(w), said.append).acquire()
  assert 'no heartbeat' in said[0]
  assert json.loads((w / '.lock').read_text())['pid'] == os.getpid()
  lock.release()
  assert not (w / '.lock').exists()


def test_the_lock_is_held_while_stages_run(tmp_path, monkeypatch):
  from mars_jax.stages import prepare
  seen = []
  monkeypatch.setattr(prepare, 'run', lambda config, w: seen.append(
      json.loads(pathlib.Path(w, '.lock').read_text())))
  main.run(small_tiny_config(), str(tmp_path / 'w'), stages=('prepare',), out=quiet)
  assert seen and seen[0]['pid'] == os.getpid()
  assert not (tmp_path / 'w' / '.lock').exists()


def test_bucket_lock_round_trip(tmp_path, monkeypatch):
  from tests import fake_gcs
  from mars_jax import workdir
  fake_gcs.use(tmp_path, monkeypatch)
  a = workdir.Lock('gs://b/run', quiet).acquire()
  with pytest.raises(workdir.WorkdirLocked, match=f'pid {os.getpid()}'):
    workdir.Lock('gs://b/run', quiet).acquire()
  a.release()
  assert not (tmp_path / 'b' / 'run' / '.lock').exists()


# --- bug 7: prepare workers exit when their parent dies -----------------------------------------

_PARENT = r'''
import sys
from mars_jax.stages import prepare
from tests.helpers import load_config
c = load_config('tiny')
c.data.synthetic.per_pitch_family = 40
c.data.examples_per_shard = 64
c.data.prepare_workers = 2
prepare.run(c, sys.argv[1])
'''


def _children(pid):
  out = []
  for d in os.listdir('/proc'):
    if d.isdigit():
      try:
        with open(f'/proc/{d}/stat') as f:
          ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        with open(f'/proc/{d}/cmdline', 'rb') as f:
          cmd = f.read().replace(b'\0', b' ').decode(errors='replace')
      except (OSError, ValueError, IndexError):
        continue
      if ppid == pid and 'spawn_main' in cmd:
        out.append(int(d))
  return out


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads /proc to find the workers')
def test_prepare_workers_exit_when_the_parent_is_killed(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parent = subprocess.Popen([sys.executable, '-c', _PARENT, str(tmp_path / 'w')],
                            cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2 and parent.poll() is None:
      time.sleep(0.5)
      workers = _children(parent.pid)
    assert len(workers) == 2, 'the prepare workers did not start'
    time.sleep(1.0)
  finally:
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
  deadline = time.time() + 30
  while time.time() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.5)
  left = [p for p in workers if _alive(p)]
  for p in left:                                      # do not leave them behind either way
    os.kill(p, signal.SIGKILL)
  assert not left, f'workers {left} outlived their killed parent'


# --- weak spots: checked before anything trains -------------------------------------------------

def test_evaluate_without_samples_is_refused_before_training_classifiers(workdir_copy):
  w, config = workdir_copy
  shutil.rmtree(os.path.join(w, 'samples'))
  before = _tree(w)
  with pytest.raises(config_lib.ConfigError, match=r'samples\.json.*add sample to --stages'):
    main.run(config, w, stages=('evaluate',), out=quiet)
  assert _tree(w) == before and not os.path.exists(os.path.join(w, 'eval'))


_JOB = r'''
import json, os, sys
from mars_jax import distributed, main
workdir, port, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
distributed.maybe_initialize(f'127.0.0.1:{port}', 2, i)
from mars_jax import workdir as workdir_lib
try:
  lock = main._lock(workdir, distributed.is_main(), lambda *a: None)
except workdir_lib.WorkdirLocked as e:
  print('REFUSED', e, flush=True)
else:
  main._barrier('locked')
  held = json.load(open(os.path.join(workdir, '.lock')))
  print('LOCKED', held['pid'], flush=True)
  main._barrier('read')
  if lock is not None:
    lock.release()
'''


def _job(workdir):
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu',
             MARS_HEARTBEAT_S='30')   # fail within 30 s if a peer dies; 10 s is missed under load
  procs = [subprocess.Popen([sys.executable, '-c', _JOB, workdir, str(port), str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  return [p.communicate(timeout=300)[0] for p in procs], [p.pid for p in procs]


@pytest.mark.multihost
def test_a_multi_process_job_holds_one_lock(tmp_path):
  """Process 0 takes the lock for the job; every process learns the outcome (none hangs)."""
  w = tmp_path / 'w'
  outs, pids = _job(str(w))
  assert all(f'LOCKED {pids[0]}' in o for o in outs), outs      # process 0's pid, seen by both
  assert not (w / '.lock').exists()
  (w / '.lock').write_text(json.dumps(_lock_info(os.getpid())))   # a live run holds it
  outs, _ = _job(str(w))
  assert all('REFUSED' in o for o in outs), outs
  assert f'pid {os.getpid()}' in outs[0]
