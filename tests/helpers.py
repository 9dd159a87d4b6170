"""Helpers shared by the tests (conftest.py keeps only pytest's set-up and fixtures)."""
import importlib.util
import os
import pathlib
import struct

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMGM6MB = '/usr/share/sounds/sf2/TimGM6mb.sf2'   # Debian's timgm6mb-soundfont


def soundfont_missing():
  """Why data.source='soundfont' cannot render here (what to install), or None."""
  from mars_jax.data import soundfont
  try:
    soundfont.library()
  except (ImportError, OSError, AttributeError) as e:
    return (f'FluidSynth unavailable ({e}): pip install -e ".[soundfont]" and '
            f'apt-get install libfluidsynth3')
  if not os.path.isfile(TIMGM6MB):
    return f'{TIMGM6MB} absent: apt-get install timgm6mb-soundfont'
  return None


# Tests that render skip, saying what to install (.ci/run installs both).
needs_soundfont = pytest.mark.skipif(bool(soundfont_missing()), reason=soundfont_missing() or '')


def load_config(name='tiny'):
  """Loads configs/<name>.py the way the CLI does."""
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', ROOT / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def small_tiny_config(**overrides):
  """The tiny config cut down for tests: fewer notes, few steps, frequent evals.

  `overrides` name nested fields with '__': small_tiny_config(tokenizer__train__steps=5)."""
  c = load_config('tiny')
  c.data.synthetic.per_pitch_family = 2
  c.data.prepare_workers = 1
  for stage in ('tokenizer', 'autoregressor'):
    t = c[stage].train
    t.steps, t.batch_size, t.log_every, t.eval_every, t.checkpoint_every = 30, 16, 5, 10, 10
    t.warmup_steps = 3
  c.autoregressor.train.lr = 3e-3
  # The plain-mean loss: after 30 level-weighted steps the coarse codes have not settled and the
  # autoregressor's accuracy at scale 2 stays 0 within 30 steps (test_stages); the weighting's
  # effect at the real budget is measured in BENCHMARKS.md, not here.
  c.tokenizer.level_weight = 0.0
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


def quiet(*args, **kwargs):
  """A log/out callback that prints nothing."""


def small_synthetic_config(**data_overrides):
  """The tiny config with a 4-pitch, 2-family synthetic corpus in 5-note shards: prepare in
  seconds. `data_overrides` set config.data fields."""
  c = load_config('tiny')
  c.data.pitch_range = (60, 63)
  c.data.synthetic.families = ('brass', 'guitar')
  c.data.synthetic.per_pitch_family = 2
  c.data.examples_per_shard = 5
  c.data.prepare_workers = 1
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def read_split(workdir, manifest, split):
  """Every record of one prepared split, decoded, in shard order."""
  from array_record.python.array_record_module import ArrayRecordReader
  from mars_jax.data import records
  out = []
  for name in manifest['splits'][split]['shards']:
    r = ArrayRecordReader(os.path.join(workdir, 'data', name))
    out += [records.decode(b) for b in r.read_all()]
    r.close()
  return out


def read_tensorboard_scalars(path) -> dict:
  """{tag: [(step, value), ...]} from one events file (or the only one in a folder).

  Reads the TFRecord framing itself and checks both checksums, so a file TensorBoard would reject
  fails here; the protos come from tensorboardX (no TensorFlow needed)."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  path = pathlib.Path(path)
  if path.is_dir():
    (path,) = [p for p in path.iterdir() if p.name.startswith('events.out.tfevents.')]
  data, out, pos = path.read_bytes(), {}, 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
    body = data[pos + 12:pos + 12 + length]
    (body_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
    assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body), path
    event = event_pb2.Event.FromString(body)
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
    pos += 16 + length
  assert pos == len(data), f'{path}: a truncated record'
  return out

