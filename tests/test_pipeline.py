"""The grain input pipeline: exact resume, seeded epochs, process sharding, CMX, workers, errors.

Examples are identified by their velocity label (= record index), which passes through
the pipeline unchanged.
"""
import json
import os

import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax.audio import cmx
from mars_jax.data import pipeline, records
from tests.helpers import load_config

N = 20            # examples in the train split
SHARDS = (12, 8)  # two shards of unequal size
BATCH = 4         # -> 5 batches an epoch


def _labels(i, lo):
  return {'pitch': lo + i % 24, 'velocity': i, 'family': i % 4, 'instrument': i % 7}


def _spec(i, shape):
  rng = np.random.default_rng(i)
  return rng.uniform(-1, 1, shape).astype(np.float16)


def write_dataset(root, config, n=N, shards=SHARDS):
  """Writes DIR/data like the prepare stage would; returns the data dir."""
  shapes = config_lib.derive(config)
  data = os.path.join(root, 'data')
  os.makedirs(data, exist_ok=True)
  names, start = [], 0
  for k, size in enumerate(shards):
    name = f'train-{k:05d}-of-{len(shards):05d}.array_record'
    recs = [records.encode(_spec(i, shapes.spectrogram), _labels(i, shapes.pitch_lo), f'n{i}')
            for i in range(start, start + size)]
    records.write_shard(os.path.join(data, name), recs)
    names.append(name)
    start += size
  assert start == n
  manifest = {
      'splits': {'train': {'count': n, 'shards': names, 'bytes': 0}},
      'spectrogram': {'shape': list(shapes.spectrogram)},
      'vocab': {'family': ['a', 'b', 'c', 'd'], 'instrument': [f'i{j}' for j in range(7)],
                'pitch_range': list(config.data.pitch_range)},
  }
  with open(os.path.join(data, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  return data


@pytest.fixture(scope='module')
def config():
  return load_config('tiny')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, config):
  return write_dataset(str(tmp_path_factory.mktemp('ds')), config)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _ids(batches):
  return [int(v) for b in batches for v in b['velocity']]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _it(config, data_dir, **kw):
  kw.setdefault('batch_size', BATCH)
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  kw.setdefault('worker_count', 0)
  return pipeline.make_iterator(config, data_dir, 'train', **kw)


@pytest.mark.parametrize('k', [3, 6])  # mid-epoch 1, and just past the epoch boundary
def test_restore_state_continues_exactly(config, data_dir, k):
  it = _it(config, data_dir, seed=7)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # must survive the JSON grain's handler writes
  expected = _take(it, 6)                          # crosses an epoch boundary either way
  fresh = _it(config, data_dir, seed=7)
  fresh.set_state(state)
  _assert_same(_take(fresh, 6), expected)
  # And a restored state is not simply the start.
  assert _ids(expected[:1]) != _ids(_take(_it(config, data_dir, seed=7), 1))


def test_seed_determines_order(config, data_dir):
  a = _ids(_take(_it(config, data_dir, seed=1), 5))
  b = _ids(_take(_it(config, data_dir, seed=1), 5))
  c = _ids(_take(_it(config, data_dir, seed=2), 5))
  assert a == b
  assert a != c
  assert a != list(range(N))  # actually shuffled
  assert _ids(_take(_it(config, data_dir, shuffle=False), 5)) == list(range(N))


def test_epochs_reshuffle_same_examples(config, data_dir):
  ids = _ids(_take(_it(config, data_dir, seed=3), 10))
  e1, e2 = ids[:N], ids[N:]
  assert sorted(e1) == sorted(e2) == list(range(N))
  assert e1 != e2


@pytest.mark.parametrize('repeat', [True, False])
def test_processes_disjoint_and_complete(config, data_dir, repeat):
  per = [_ids(_take(_it(config, data_dir, seed=5, repeat=repeat, process_index=p,
                        process_count=2), N // BATCH)) for p in (0, 1)]
  assert all(len(p) == N // 2 for p in per)
  assert not set(per[0]) & set(per[1])
  assert sorted(per[0] + per[1]) == list(range(N))
  with pytest.raises(ValueError, match='divisible'):
    _it(config, data_dir, batch_size=5, process_count=2)


def test_global_batches_do_not_depend_on_process_count(config, data_dir):
  """Rows of process 0 then process 1 form exactly the 1-process global batch, in order."""
  one = _take(_it(config, data_dir, seed=9), 8)
  two = [_take(_it(config, data_dir, seed=9, process_index=p, process_count=2), 8) for p in (0, 1)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*two)]
  _assert_same(one, joined)


@pytest.mark.parametrize('label', ['family', 'instrument'])
def test_cmx_and_labels(config, data_dir, label):
  config = config.copy_and_resolve_references()
  config.data.instrument_label = label
  shapes = config_lib.derive(config)
  batches = _take(_it(config, data_dir, shuffle=False, repeat=False), N // BATCH)
  b0 = batches[0]
  assert b0['image'].dtype == np.float32 and b0['image'].shape == (BATCH, *shapes.image)
  for key in ('pitch', 'instrument', 'velocity'):
    assert b0[key].dtype == np.int32 and b0[key].shape == (BATCH,)
  for b in batches:
    for j, i in enumerate(b['velocity']):
      i = int(i)
      want = cmx.cmx(_spec(i, shapes.spectrogram).astype(np.float32), config.cmx.factor)
      np.testing.assert_array_equal(b['image'][j], want)
      lab = _labels(i, shapes.pitch_lo)
      assert b['pitch'][j] == lab['pitch'] - shapes.pitch_lo
      assert b['instrument'][j] == lab[label]


def test_workers_match_in_process(config, data_dir):
  ref = _take(_it(config, data_dir, seed=9), 9)
  it = _it(config, data_dir, seed=9, worker_count=2)
  try:
    _assert_same(_take(it, 4), ref[:4])
    state = it.get_state()
    _assert_same(_take(it, 3), ref[4:7])
  finally:
    it.close()
  # A checkpoint taken with 2 workers resumes with 0 (another machine), and the reverse.
  plain = _it(config, data_dir, seed=9)
  plain.set_state(state)
  _assert_same(_take(plain, 5), ref[4:9])
  again = _it(config, data_dir, seed=9, worker_count=2)
  try:
    again.set_state(plain.get_state())  # 9 batches in, odd: mid-cycle of the 2 workers
    assert again.get_state()['batches'] == 9
    _assert_same(_take(again, 1), _take(_it(config, data_dir, seed=9), 10)[9:])
  finally:
    again.close()


def test_orbax_checkpoint_round_trip(config, data_dir, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  it = _it(config, data_dir, seed=4)
  _take(it, 3)
  mgr = ocp.CheckpointManager(str(tmp_path / 'ck'), item_names=('data_iter',))
  mgr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  expected = _take(it, 4)
  fresh = _it(config, data_dir, seed=4)
  mgr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  mgr.close()
  _assert_same(_take(fresh, 4), expected)


def test_eval_batches_single_pass_padded(config, data_dir):
  batches = list(pipeline.eval_batches(config, data_dir, 'train', 8, process_index=0,
                                       process_count=1))
  assert len(batches) == 3 and all(b['image'].shape[0] == 8 for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == N and mask[:N].all()
  assert _ids(batches)[:N] == list(range(N))
  assert not batches[-1]['image'][~batches[-1]['mask']].any()
  # Two processes: equal batch counts, disjoint real examples covering max_examples.
  per = [list(pipeline.eval_batches(config, data_dir, 'train', 4, max_examples=11,
                                    process_index=p, process_count=2)) for p in (0, 1)]
  assert len(per[0]) == len(per[1]) == 3
  real = [int(v) for p in per for b in p for v, m in zip(b['velocity'], b['mask']) if m]
  assert sorted(real) == list(range(11))


def test_shape_mismatch_names_fields(config, data_dir):
  bad = config.copy_and_resolve_references()
  bad.spectrogram.n_fft, bad.spectrogram.hop = 512, 32  # 256 x 256: a valid config, other data
  bad.tokenizer.scales = (1, 2, 4, 8, 16)
  with pytest.raises(pipeline.DataError, match=r'spectrogram\.n_fft') as e:
    _it(bad, data_dir)
  assert 'prepare' in str(e.value)


def test_missing_files_name_the_culprit(config, tmp_path):
  with pytest.raises(pipeline.DataError, match='prepare') as e:
    _it(config, str(tmp_path / 'nothing'))
  assert 'manifest.json' in str(e.value)
  data = write_dataset(str(tmp_path), config, n=4, shards=(2, 2))
  with pytest.raises(pipeline.DataError, match="'valid'"):
    pipeline.make_iterator(config, data, 'valid', batch_size=2, process_index=0, process_count=1)
  gone = os.path.join(data, 'train-00001-of-00002.array_record')
  os.remove(gone)
  with pytest.raises(pipeline.DataError, match='prepare') as e:
    _it(config, data, batch_size=2)
  assert gone in str(e.value)


def test_index_is_each_examples_place_in_its_split_across_epochs_and_processes(config, data_dir):
  """'index' keys per-example tables (the autoregressor's cached tokens): it must name the very
  record the example came from, in every epoch (grain hands repeated parents index + epoch * n),
  on every process (worker processes give the same batches: test_workers_match_in_process).
  Record i carries velocity i."""
  for pc in (1, 2):
    for pi in range(pc):
      it = pipeline.make_iterator(config, data_dir, 'train', batch_size=BATCH, seed=3,
                                  process_index=pi, process_count=pc, worker_count=0)
      batches = _take(it, 3 * N // BATCH)              # three epochs
      index = [int(v) for b in batches for v in b['index']]
      assert index == _ids(batches)
  one = _take(pipeline.make_iterator(config, data_dir, 'train', batch_size=BATCH, seed=3,
                                     worker_count=0), 3 * N // BATCH)
  index = [int(v) for b in one for v in b['index']]
  for epoch in range(3):                               # each epoch: every example once
    assert sorted(index[epoch * N:(epoch + 1) * N]) == list(range(N))
  evaluated = list(pipeline.eval_batches(config, data_dir, 'train', batch_size=8))
  real = [int(i) for b in evaluated for i, m in zip(b['index'], b['mask']) if m]
  assert real == list(range(N)) == [int(v) for b in evaluated
                                    for v, m in zip(b['velocity'], b['mask']) if m]


def test_batches_without_images_are_the_same_batches_less_the_image(config, data_dir):
  """images=False (the autoregressor on cached tokens) drops 'image' and nothing else."""
  full = _take(pipeline.make_iterator(config, data_dir, 'train', batch_size=BATCH, seed=4,
                                      worker_count=0), 7)
  lean = _take(pipeline.make_iterator(config, data_dir, 'train', batch_size=BATCH, seed=4,
                                      worker_count=0, images=False), 7)
  assert all('image' not in b for b in lean)
  _assert_same([{k: v for k, v in b.items() if k != 'image'} for b in full], lean)
