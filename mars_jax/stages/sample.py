"""`sample` stage: writes DIR/samples/*.wav and samples.json for the configured requests."""
import json
import re

import jax

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax import progress
from mars_jax import workdir as workdir_lib
from mars_jax.sample import Generator, save_wav

NAME = 'sample'


def is_complete(config, workdir):
  return workdir_lib.complete(config, workdir, NAME)


def requests(config, pitches, instruments):
  """The (pitch, instrument) of each sample: sample.num spread over the pitch x instrument grid.

  sample.pitches / sample.instruments narrow the grid (() = everything trained); sample.num = 0
  takes the whole grid once. Consecutive requests walk the grid with a stride coprime to its
  size, so a small `num` still covers many pitches and instruments.
  """
  s = config.sample
  ps = [int(p) for p in s.pitches] or pitches
  ins = list(s.instruments) or instruments
  grid = [(p, i) for p in ps for i in ins]
  n = s.num or len(grid)
  stride = next(k for k in range(len(ins) + 1, 10 * len(grid) + 2)
                if _gcd(k, len(grid)) == 1) if len(grid) > 1 else 1
  return [grid[(j * stride) % len(grid)] for j in range(n)]


def slug(name, max_len=40) -> str:
  """A file-name-safe form of a label: letters, digits, '_' and '-' only (no '/', no '..', no
  spaces), at most `max_len` characters; samples.json keeps the real name."""
  out = re.sub(r'[^A-Za-z0-9_-]+', '-', str(name)).strip('-_')[:max_len].strip('-_')
  return out or 'x'


def file_name(index, pitch, instrument, seed) -> str:
  """`{index:05d}_p{pitch}_{slug}_s{seed}.wav`: unique through the index, safe through the slug."""
  return f'{index:05d}_p{int(pitch)}_{slug(instrument)}_s{int(seed)}.wav'


def _gcd(a, b):
  while b:
    a, b = b, a % b
  return a


def run(config, workdir):
  """Samples the configured requests into DIR/samples.

  With several processes the batches are dealt round-robin: process i samples batches i, i+P, ...
  on its own first device (each holds the whole model: the frozen sampler is small and needs no
  collectives) and writes their wavs to the shared workdir; after a barrier process 0 writes
  samples.json and the marker. Sharding, not process 0 alone, because a pod then samples P
  times faster and no host waits minutes in a barrier; a note depends only on its request, seed
  and batch, so the files equal a 1-process run's."""
  config_lib.derive(config)
  if not workdir_lib.complete(config, workdir, 'autoregressor'):
    raise config_lib.ConfigError(f'sampling needs a trained autoregressor for this config in '
                                 f'{workdir}/autoregressor; run --stages=autoregressor first.')
  out = workdir_lib.samples_dir(workdir)
  fp = workdir_lib.fingerprint(config, NAME)
  workdir_lib.claim(out, fp, 'samples')
  gen = Generator.from_workdir(workdir, config)
  reqs = requests(config, gen.pitches, gen.instruments)
  s = config.sample
  entries = []
  bs = max(1, s.batch_size)
  pi, pc = jax.process_index(), jax.process_count()
  bar = progress.Progress('sample', len(reqs), 'notes', every=bs)
  for k, start in enumerate(range(0, len(reqs), bs)):
    chunk = reqs[start:start + bs]
    seeds = [s.seed + start + j for j in range(len(chunk))]
    mine = k % pc == pi
    if mine:
      waves = gen.audio(gen.spectrograms([p for p, _ in chunk], [i for _, i in chunk], seeds))
    for j, ((pitch, inst), seed) in enumerate(zip(chunk, seeds)):
      name = file_name(start + j, pitch, inst, seed)   # the real name goes in the entry
      if mine:
        save_wav(fs.join(out, name), waves[j], gen.sample_rate)
      entries.append({'file': name, 'pitch': pitch, 'instrument': inst,
                      'instrument_label': config.data.instrument_label, 'seed': seed,
                      'cfg': float(s.cfg), 'top_k': int(s.top_k), 'top_p': float(s.top_p),
                      'sample_rate': gen.sample_rate,
                      'duration': float(config.spectrogram.duration)})
    bar.update(min(start + bs, len(reqs)))
  bar.close()
  if pc > 1:   # every wav is written before samples.json says the folder is complete
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('mars_jax/samples_written')
  if pi == 0:
    fs.write_text(fs.join(out, workdir_lib.SAMPLES_JSON), json.dumps(entries, indent=1))
  workdir_lib.mark_complete(out, fp, count=len(entries))
