"""Training and evaluation input pipelines over the prepared ArrayRecord shards (grain).

Training: source -> seeded shuffle -> repeat -> per-process slice -> decode + CMX -> batch,
all on a `grain.MapDataset`, so an element is a pure function of (seed, index) and the
iterator state is a single position: `get_state()`/`set_state()` restore it exactly, and
that state goes into the orbax checkpoint (`grain.checkpoint.CheckpointSave`).
CMX happens here, at load time, so the shards stay plain spectrograms that any CMX factor
or mode can read.
"""
from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax.audio import cmx
from mars_jax.data import records

# Per-process read threads and the number of ready batches they may hold. grain's defaults
# (16 threads, 500 elements) are sized for small records; ours are ~1 MiB batches-of-64.
READ_THREADS = 4
READ_BUFFER = 8


class DataError(ValueError):
  """The prepared data do not match the request or the config; the message says how to fix it."""


def load_manifest(data_dir: str) -> dict:
  """Reads DIR/data/manifest.json, which the prepare stage writes last (so it means 'complete')."""
  path = fs.join(data_dir, records.MANIFEST)
  if not fs.exists(path):
    raise DataError(f'no dataset manifest at {path}: run the prepare stage first '
                    f'(python -m mars_jax.main --stages=prepare ...).')
  return json.loads(fs.read_text(path))


def _check_manifest(manifest: dict, shapes: config_lib.Shapes, config, data_dir: str,
                    split: str) -> list:
  """Validates the manifest against the config and the disk; returns the shard paths."""
  splits = manifest.get('splits', {})
  if split not in splits:
    raise DataError(f'split {split!r} is not in {fs.join(data_dir, records.MANIFEST)} '
                    f'(it has {sorted(splits)}); rerun the prepare stage.')
  got = tuple(int(v) for v in manifest['spectrogram']['shape'])
  want = tuple(shapes.spectrogram)
  if got != want:
    s = config.spectrogram
    raise DataError(
        f'the prepared spectrograms in {data_dir} are {got[0]} x {got[1]} (manifest '
        f'spectrogram.shape) but the config gives {want[0]} x {want[1]}: rows = '
        f'spectrogram.n_fft/2 = {s.n_fft}/2, frames = spectrogram.sample_rate*spectrogram.duration'
        f'/spectrogram.hop = {s.sample_rate}*{s.duration}/{s.hop}. Rerun the prepare stage for '
        f'this config (new workdir) or change the config to match the data.')
  lo, hi = shapes.pitch_lo, shapes.pitch_lo + shapes.num_pitches - 1
  vocab = manifest.get('vocab', {})
  if 'pitch_range' in vocab:
    mlo, mhi = (int(v) for v in vocab['pitch_range'])
    if mlo < lo or mhi > hi:
      raise DataError(f'the prepared data hold pitches {mlo}..{mhi} (manifest vocab.pitch_range) '
                      f'outside the config data.pitch_range=({lo}, {hi}); rerun the prepare '
                      f'stage or widen data.pitch_range.')
  paths = [fs.join(data_dir, name) for name in splits[split]['shards']]
  sizes = splits[split].get('shard_bytes') or [None] * len(paths)
  for p, size in zip(paths, sizes):
    if not fs.exists(p):
      raise DataError(f'shard {p} is listed in the manifest for split {split!r} but is missing '
                      f'on disk; rerun the prepare stage.')
    if size is not None and fs.path(p).stat().length != size:
      raise DataError(f'shard {p} has {fs.path(p).stat().length} bytes but was written with '
                      f'{size} (truncated or damaged); rerun the prepare stage, which redoes it.')
  if not paths or int(splits[split]['count']) == 0:
    raise DataError(f'split {split!r} in {data_dir} is empty; rerun the prepare stage with more '
                    f'data or check data.max_files and the data filters.')
  return paths


@dataclasses.dataclass(frozen=True)
class Decode(grain.transforms.MapWithIndex):
  """(index, record bytes) -> model inputs. A frozen dataclass of plain fields: pickled to
  workers. Applied straight on the source, so 'index' is the example's place in its split
  (grain hands a repeated dataset's parents index + epoch * size: taken modulo `size`), which
  keys per-example tables such as the autoregressor's cached tokens."""
  mode: str            # cmx.mode
  factor: int          # cmx.factor
  pitch_lo: int
  num_pitches: int
  instrument_label: str  # 'family' | 'instrument'
  size: int            # examples in the split
  image: bool = True   # False: labels and index only (the autoregressor reading cached tokens)

  def map_with_index(self, index: int, record: bytes) -> dict:
    r = records.decode(record)
    pitch = int(r['pitch']) - self.pitch_lo
    if not 0 <= pitch < self.num_pitches:
      raise DataError(f'record {r["name"]!r} has MIDI pitch {int(r["pitch"])} outside '
                      f'data.pitch_range; rerun the prepare stage for this config.')
    out = {'pitch': np.int32(pitch), 'instrument': np.int32(r[self.instrument_label]),
           'velocity': np.int32(r['velocity']), 'index': np.int32(index % self.size)}
    if self.image:
      # CMX only permutes values, so it runs in the storage dtype (half the bytes moved);
      # `to_float32` casts whole batches once.
      out['image'] = np.ascontiguousarray(cmx.to_image(r['spec'], self))  # reads .mode, .factor
    return out


def to_float32(batch: dict) -> dict:
  """Casts the stacked images to float32: equal to casting before CMX, which only moves values."""
  if 'image' not in batch:
    return batch
  return {**batch, 'image': batch['image'].astype(np.float32)}


def _decoder(config, shapes, size, image=True) -> Decode:
  return Decode(mode=str(config.cmx.mode), factor=int(config.cmx.factor),
                pitch_lo=shapes.pitch_lo, num_pitches=shapes.num_pitches,
                instrument_label=str(config.data.instrument_label), size=size, image=image)


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return process_index, process_count


def open_split(config, data_dir, split):
  """(random-access grain MapDataset of `split`'s encoded records, Shapes), after checking the
  manifest against the config and the disk (DataError naming the fix otherwise)."""
  shapes = config_lib.derive(config)
  paths = _check_manifest(load_manifest(data_dir), shapes, config, data_dir, split)
  return grain.MapDataset.source(_array_records(paths)), shapes


def _array_records(paths):
  """Random access over the shards; ArrayRecord reads local paths and gs:// (array_record>=0.8)."""
  return grain.sources.ArrayRecordDataSource([fs.absolute(p) for p in paths])


def make_iterator(config, data_dir: str, split: str, *, batch_size: int, shuffle: bool = True,
                  repeat: bool = True, seed: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, worker_count: int | None = None,
                  drop_remainder: bool = True, images: bool = True) -> 'BatchIterator':
  """A checkpointable iterator over this process's share of global batches of `batch_size`.

  Each element is {'image': f32 (b, H, W, C), 'pitch', 'instrument', 'velocity', 'index':
  i32 (b,)} ('index': each example's place in the split) with b = batch_size // process_count.
  The shuffle is seeded by `seed` (default config.seed) folded with the epoch, so every epoch
  has a new but reproducible order. `images=False` leaves 'image' out (no CMX, nothing to move
  to the devices): for a model that reads everything else from a table keyed by 'index'.
  Each global batch is consecutive examples of the one global order, process p holding
  its p-th slice: disjoint across processes, together the whole epoch, and the same
  global batches for any process count. `worker_count` (default config.data.loader_workers) > 0
  decodes in that many spawned processes; the batches are identical to worker_count=0.
  """
  pi, pc = _process(process_index, process_count)
  if batch_size % pc:
    raise ValueError(f'global batch_size={batch_size} is not divisible by the {pc} processes.')
  local = batch_size // pc
  seed = int(config.seed if seed is None else seed) % 2**32
  workers = int(config.data.loader_workers if worker_count is None else worker_count)

  ds, shapes = open_split(config, data_dir, split)
  n = len(ds)
  ds = ds.map_with_index(_decoder(config, shapes, n, images))   # lazy: only what is read
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)  # reseeds the shuffle each epoch (seed + epoch)
  else:  # every process gets the same number of batches
    ds = ds[:n // batch_size * batch_size] if drop_remainder else ds[:n // pc * pc]
  if not repeat and (n // pc < local if drop_remainder else n // pc == 0):
    raise DataError(f'split {split!r} has {n} examples: too few for a per-process batch of '
                    f'{local} over {pc} processes.')
  # Batch the one global order, then deal whole batches out: process p holds rows
  # [p*local, (p+1)*local) of every global batch, so a global batch has the same rows in the
  # same order whatever the process count (a 2-process run equals a 1-process run).
  ds = ds.batch(local, drop_remainder=drop_remainder)[pi::pc]
  ds = ds.map(to_float32)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                               prefetch_buffer_size=READ_BUFFER))
  if workers > 0:
    _absl_flags_ready()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                           per_worker_buffer_size=2))
  return BatchIterator(iter(it_ds), workers)


def _absl_flags_ready():
  """grain's worker start-up reads absl flags; outside absl.app (scripts, notebooks) they are
  unparsed and mp_prefetch raises UnparsedFlagAccessError. Defaults are what we want."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _grain_state(batches: int, workers: int) -> dict:
  """grain 0.2's own iterator state after `batches` batches with `workers` worker processes.

  Without workers it is the PrefetchDatasetIterator's position; with W workers, worker i
  serves batches i, i+W, ... and an InterleaveDatasetIterator cycles over them. Exact only
  for iterators that have not run out (repeat=True). tests/test_pipeline.py checks it.
  """
  if workers == 0:
    return {'next_index': batches}
  return {'next_index_in_cycle': batches % workers, 'next_index_in_datasets': workers,
          'iterators_in_use_indices': list(range(workers)),
          'iterators_in_use_states': [{'next_index': (batches - i + workers - 1) // workers}
                                      for i in range(workers)],
          'exhausted': [0] * workers, 'future_states': {}}


class BatchIterator(grain.DatasetIterator):
  """grain's iterator plus a batch count, so a checkpoint survives a change of loader_workers.

  State: {'batches', 'workers', 'grain'}. With the same worker count the grain state is
  restored verbatim; with another, it is rebuilt from the batch count (`_grain_state`).
  """

  def __init__(self, parent: grain.DatasetIterator, workers: int):
    super().__init__(parent)
    self._workers = workers
    self._batches = 0

  def __next__(self):
    out = next(self._parent)
    self._batches += 1
    return out

  def get_state(self) -> dict:
    return {'batches': self._batches, 'workers': self._workers,
            'grain': self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or 'batches' not in state:
      raise DataError(f'not a mars_jax data-iterator state: {str(state)[:200]}')
    if int(state['workers']) == self._workers:
      self._parent.set_state(state['grain'])
    else:
      self._parent.set_state(_grain_state(int(state['batches']), self._workers))
    self._batches = int(state['batches'])


class _Padded:
  """Random access over `ds` extended to `length` with a masked-out blank element."""

  def __init__(self, ds, length, blank):
    self._ds, self._n, self._length, self._blank = ds, len(ds), length, blank

  def __len__(self):
    return self._length

  def __getitem__(self, j):
    return self._ds[j] if j < self._n else self._blank


def _with_mask(x: dict) -> dict:
  return {**x, 'mask': np.bool_(True)}


def eval_batches(config, data_dir: str, split: str, batch_size: int,
                 max_examples: int | None = None, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.DatasetIterator:
  """One unshuffled pass over `split` (its first `max_examples`) for held-out evaluation.

  Batches are always full (batch_size // process_count per process, same count on every
  process, so collective eval steps line up): the tail is padded with zero images, and
  the extra key 'mask' (bool (b,)) is True for real examples. Weight metrics by it.
  """
  pi, pc = _process(process_index, process_count)
  if batch_size % pc:
    raise ValueError(f'global batch_size={batch_size} is not divisible by the {pc} processes.')
  local = batch_size // pc
  ds, shapes = open_split(config, data_dir, split)
  n = len(ds) if max_examples is None else min(len(ds), int(max_examples))
  ds = ds[:n].map_with_index(_decoder(config, shapes, n)).map(_with_mask)
  per_process = -(-n // pc)
  total = -(-per_process // local) * local * pc
  blank = {'image': np.zeros(shapes.image, np.float32), 'pitch': np.int32(0),
           'instrument': np.int32(0), 'velocity': np.int32(0), 'index': np.int32(0),
           'mask': np.bool_(False)}
  ds = grain.MapDataset.source(_Padded(ds, total, blank))[pi::pc].batch(local).map(to_float32)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                   prefetch_buffer_size=READ_BUFFER)))
