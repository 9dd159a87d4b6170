"""Sampling speed: (pitch, instrument) requests -> token maps -> spectrogram -> Griffin-Lim audio.

Times the two jitted programs of `mars_jax.sample.Generator` exactly as `generate` runs them:
  (a) tokens->spec  `_spec_fn`: next-scale sampling with the KV cache, CFG on (the config's
                    sample.cfg / top_k / top_p, so the batch is doubled with NULL-condition
                    rows), then the tokenizer decoder and un-CMX;
  (b) Griffin-Lim   `_audio_fn`: denormalise + fast Griffin-Lim (spectrogram.griffin_lim_iters);
  (c) both          (a) then (b), blocking only at the end.
For each config and batch size: the first call of (a) and of (b) (compile + one run; the table's
compile = first call - median call), then the median wall seconds of up to --reps calls
(block_until_ready; fewer once they add up to --rep-seconds, e.g. base on a CPU). Real-time
factor = batch * clip seconds / seconds per batch (higher is better).

By default the tokenizer and VAR are RANDOMLY INITIALISED at the config's shapes and dtypes
(the models `load_params` would build, float32 params as restored from a checkpoint): random
weights cost the same as trained ones. --workdir DIR times a trained workdir's Generator instead.

Long combinations are skipped: the run time of (config, batch) is estimated from the largest
batch already measured for that config (linear in batch) and skipped when it exceeds
--max-seconds or would overrun the --budget of the whole run.

Run:
  python -m mars_jax.bench sampling [--configs tiny,base] [--batches 1,8,64] [--workdir DIR]
                                    [--reps 3] [--rep-seconds 30] [--max-seconds 150]
                                    [--budget 450] [--json]
Progress goes to stderr; the markdown table (or, with --json, one JSON document) to stdout.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

from mars_jax.bench import machine as machine_lib

TARGETS = (
    'CPU tiny: >= 10x real time (a+b); '
    'GPU base batch 64: >= 1000x real time (a+b)')


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def load_config(name):
  """configs/NAME.py (or a path to a config file) -> ConfigDict."""
  path = name if name.endswith('.py') else os.path.join(
      os.path.dirname(__file__), '..', '..', 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'cfg_{os.path.basename(path)[:-3]}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def instrument_names(config):
  """Instrument labels a random model is built for; the count only sizes an embedding table."""
  if config.data.source == 'synthetic':
    return list(config.data.synthetic.families)
  return ['bass', 'brass', 'flute', 'guitar', 'keyboard', 'mallet', 'organ', 'reed', 'string',
          'vocal']   # NSynth's families


def random_generator(config, seed=0):
  """A Generator with randomly initialised tokenizer + VAR params at `config`'s shapes."""
  import jax
  import numpy as np
  from flax.linen import meta
  from mars_jax import config as config_lib
  from mars_jax import trained
  from mars_jax.sample import Generator
  from mars_jax.stages import autoregressor as ar_stage
  from mars_jax.stages import tokenizer as tok_stage

  shapes = config_lib.derive(config)
  names = instrument_names(config)
  manifest = {'vocab': {'family': names, 'instrument': names}}
  n_inst = trained.num_instruments(config, manifest)
  rng_tok, rng_var = jax.random.split(jax.random.PRNGKey(seed))

  tok_task, tok_model = tok_stage.make_task(config, shapes)
  image = np.zeros((1,) + tuple(shapes.image), np.float32)
  tok_params = trained.tokenizer_params(
      config, meta.unbox(jax.jit(tok_task.init)(rng_tok, {'image': image})))

  var_task, var_model = ar_stage.make_task(config, shapes, n_inst, tok_model=None)
  batch = {'image': image, 'pitch': np.zeros((1,), np.int32),
           'instrument': np.zeros((1,), np.int32)}
  var_params = meta.unbox(jax.jit(var_task.init)(rng_var, batch))
  return Generator(config, manifest, tok_model, tok_params, var_model, var_params)


def _count(tree):
  import jax
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


class Bench:
  """Times one Generator's two jitted programs at a given batch size."""

  def __init__(self, gen, reps, rep_seconds):
    self.gen, self.reps, self.rep_seconds = gen, reps, rep_seconds
    self.clip_s = float(gen.shapes.frames * gen.config.spectrogram.hop / gen.sample_rate)

  def args(self, batch):
    """The spectrogram program's arguments for `batch` requests (pitches and instruments cycled)."""
    import jax
    import jax.numpy as jnp
    s, sh = self.gen.config.sample, self.gen.shapes
    pitch = jnp.asarray([i % sh.num_pitches for i in range(batch)], jnp.int32)
    inst = jnp.asarray([i % len(self.gen.instruments) for i in range(batch)], jnp.int32)
    seeds = jnp.arange(batch, dtype=jnp.int32)
    return (self.gen.var_params, self.gen.tokenizer_params, pitch, inst, seeds,
            jax.random.PRNGKey(0), jnp.float32(s.cfg), int(s.top_k), float(s.top_p))

  def _reps(self, fn):
    """Up to `reps` timed calls, stopping once they add up to `rep_seconds` (at least one)."""
    wall, cpu = [], []
    while len(wall) < self.reps and (not wall or sum(wall) < self.rep_seconds):
      t0, c0 = time.perf_counter(), time.process_time()
      fn()
      wall.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    return wall, cpu

  def run(self, batch):
    import jax
    spec_fn, audio_fn = self.gen.spectrogram_fn, self.gen.audio_fn
    args = self.args(batch)

    def a():
      return jax.block_until_ready(spec_fn(*args)[0])

    t0 = time.perf_counter()
    spec = a()
    first_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    wave = jax.block_until_ready(audio_fn(spec))
    first_b = time.perf_counter() - t0
    assert wave.shape[0] == batch, wave.shape
    ta, _ = self._reps(a)
    tb, _ = self._reps(lambda: jax.block_until_ready(audio_fn(spec)))
    tc, cc = self._reps(lambda: jax.block_until_ready(audio_fn(spec_fn(*args)[0])))
    med = statistics.median
    out = {'batch': batch, 'first_call_a_s': first_a, 'first_call_b_s': first_b,
           'a_s': med(ta), 'b_s': med(tb), 'ab_s': med(tc), 'ab_cpu_s': med(cc),
           'a_runs': ta, 'b_runs': tb, 'ab_runs': tc}
    out['compile_a_s'] = max(first_a - out['a_s'], 0.0)   # first call = compile + one run
    out['compile_b_s'] = max(first_b - out['b_s'], 0.0)
    audio_s = batch * self.clip_s
    out.update(rtf_a=audio_s / out['a_s'], rtf_b=audio_s / out['b_s'],
               rtf_ab=audio_s / out['ab_s'])
    return out

  def estimate(self, measured, batch):
    """Wall seconds `run(batch)` would take, from the largest measured batch (linear in batch)."""
    ref = max(measured, key=lambda r: r['batch'])
    scale = batch / ref['batch']
    a, b = ref['a_s'] * scale, ref['b_s'] * scale

    def n(t):
      return max(1, min(self.reps, math.ceil(self.rep_seconds / max(t, 1e-9))))

    return (ref['compile_a_s'] + ref['compile_b_s'] + a + b
            + n(a) * a + n(b) * b + n(a + b) * (a + b))


def describe_config(gen):
  c, sh = gen.config, gen.shapes
  a = c.autoregressor
  return (f'{sh.freq_bins}x{sh.frames} spectrogram ({c.spectrogram.sample_rate} Hz, '
          f'{c.spectrogram.duration} s), latent {sh.latent[0]}x{sh.latent[1]}x{sh.latent[2]}, '
          f'{len(sh.scales)} scales / {sh.num_tokens} tokens, VAR depth {gen.var.depth} '
          f'width {gen.var.width} ({_count(gen.var_params) / 1e6:.1f} M params, '
          f'{a.train.compute_dtype}), tokenizer {_count(gen.tokenizer_params) / 1e6:.1f} M params '
          f'({c.tokenizer.train.compute_dtype}), codebook {c.tokenizer.codebook_size}, '
          f'GL {c.spectrogram.griffin_lim_iters} iters n_fft {c.spectrogram.n_fft} hop '
          f'{c.spectrogram.hop}, cfg {c.sample.cfg} top_k {c.sample.top_k} top_p {c.sample.top_p}')


def _rtf(v):
  return f'{v:.0f}x' if v >= 100 else f'{v:.1f}x' if v >= 1 else f'{v:.2f}x'


def _fmt_rows(rows):
  lines = ['| config | batch | compile a / b (s) | a: tokens->spec s | b: Griffin-Lim s | '
           'a+b s | a+b CPU s | RTF a+b | RTF a | RTF b | calls a/b/a+b |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'skipped' in r:
      lines.append(f'| {r["config"]} | {r["batch"]} | {r["skipped"]} | | | | | | | | |')
      continue
    lines.append(
        f'| {r["config"]} | {r["batch"]} | {r["compile_a_s"]:.1f} / {r["compile_b_s"]:.1f} '
        f'| {r["a_s"]:.3f} | {r["b_s"]:.3f} | {r["ab_s"]:.3f} | {r["ab_cpu_s"]:.3f} '
        f'| {_rtf(r["rtf_ab"])} | {_rtf(r["rtf_a"])} | {_rtf(r["rtf_b"])} '
        f'| {len(r["a_runs"])}/{len(r["b_runs"])}/{len(r["ab_runs"])} |')
  return '\n'.join(lines)


def _targets(rows, backend):
  """The two stated targets, checked against the rows measured here."""
  out = []
  tiny = [r for r in rows if r['config'] == 'tiny' and 'skipped' not in r]
  if backend == 'cpu' and tiny:
    best = max(tiny, key=lambda r: r['rtf_ab'])
    ok = all(r['rtf_ab'] >= 10 for r in tiny)
    out.append(f'CPU tiny >= 10x real time (a+b): {"met" if ok else "NOT met"} at '
               f'{"every batch" if ok else "some batches"} (min '
               f'{min(r["rtf_ab"] for r in tiny):.1f}x, best {best["rtf_ab"]:.1f}x at batch '
               f'{best["batch"]})')
  elif backend == 'cpu':
    out.append("CPU tiny >= 10x real time (a+b): n/a (no 'tiny' row measured; a --workdir run "
               'is labelled by its folder name)')
  else:
    out.append('CPU tiny >= 10x real time (a+b): n/a (not measured on a CPU here)')
  base64 = [r for r in rows if r['config'] == 'base' and r['batch'] == 64 and 'skipped' not in r]
  if backend == 'gpu' and base64:
    v = base64[0]['rtf_ab']
    out.append(f'GPU base batch 64 >= 1000x real time (a+b): '
               f'{"met" if v >= 1000 else "NOT met"} ({v:.0f}x)')
  else:
    out.append('GPU base batch 64 >= 1000x real time (a+b): n/a (no GPU run here)')
  return out


def main(argv):
  p = argparse.ArgumentParser(prog='python -m mars_jax.bench sampling', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', default='tiny,base',
                 help='comma-separated configs/NAME.py (ignored with --workdir)')
  p.add_argument('--batches', default='1,8,64', help='comma-separated batch sizes')
  p.add_argument('--workdir', default='', help='time a trained workdir instead of random params')
  p.add_argument('--reps', type=int, default=3, help='timed calls per measurement (median)')
  p.add_argument('--rep-seconds', type=float, default=30.0,
                 help='stop repeating a measurement once its calls add up to this (min 1 call)')
  p.add_argument('--max-seconds', type=float, default=150.0,
                 help='skip a (config, batch) whose estimated run time exceeds this')
  p.add_argument('--budget', type=float, default=450.0,
                 help='skip combinations that would take the whole run past this many seconds')
  p.add_argument('--json', action='store_true', help='one JSON document instead of markdown')
  args = p.parse_args(argv)
  batches = sorted(int(b) for b in args.batches.split(',') if b)

  import jax
  t_start = time.perf_counter()
  machine_start = machine_lib.describe()
  backend = 'gpu' if jax.default_backend() in ('gpu', 'cuda', 'rocm') else jax.default_backend()

  if args.workdir:
    from mars_jax.sample import Generator
    sources = [(os.path.basename(os.path.normpath(args.workdir)),
                lambda: Generator.from_workdir(args.workdir))]
  else:
    sources = [(name, (lambda n=name: random_generator(load_config(n))))
               for name in args.configs.split(',') if name]

  rows, configs = [], {}
  for name, build in sources:
    _log(f'[{name}] building generator ...')
    t0 = time.perf_counter()
    gen = build()
    configs[name] = {'description': describe_config(gen), 'build_s': time.perf_counter() - t0,
                     'clip_s': None}
    bench = Bench(gen, args.reps, args.rep_seconds)
    configs[name]['clip_s'] = bench.clip_s
    _log(f'[{name}] {configs[name]["description"]} (built in {configs[name]["build_s"]:.1f} s)')
    measured = []
    for b in batches:
      elapsed = time.perf_counter() - t_start
      if measured:
        est = bench.estimate(measured, b)
        if est > args.max_seconds or elapsed + est > args.budget:
          why = 'limit' if est > args.max_seconds else 'budget'
          _log(f'[{name}] batch {b}: skipped (est. {est:.0f} s, {why})')
          rows.append({'config': name, 'batch': b, 'estimated_s': est,
                       'skipped': f'skipped (est. {est:.0f} s)'})
          continue
      elif elapsed > args.budget:
        rows.append({'config': name, 'batch': b, 'estimated_s': None,
                     'skipped': 'skipped (budget spent)'})
        continue
      _log(f'[{name}] batch {b} ...')
      t0 = time.perf_counter()
      r = bench.run(b)
      r.update(config=name, wall_s=time.perf_counter() - t0)
      if measured:
        r['estimated_s'] = bench.estimate(measured, b)
      measured.append(r)
      rows.append(r)
      _log(f'[{name}] batch {b}: a {r["a_s"]:.3f} s, b {r["b_s"]:.3f} s, a+b {r["ab_s"]:.3f} s, '
           f'RTF a+b {r["rtf_ab"]:.1f}x (took {r["wall_s"]:.0f} s)')
    del gen, bench

  result = {'machine': machine_start, 'machine_end': machine_lib.describe(),
            'backend': backend, 'source': args.workdir or 'random params',
            'reps': args.reps, 'configs': configs, 'rows': rows,
            'targets': _targets(rows, backend), 'total_s': time.perf_counter() - t_start}
  if args.json:
    print(json.dumps(result, indent=2))
    return 0
  print(f'machine: {machine_start}')
  print(f'at the end: load average {machine_lib.load_average()}; total {result["total_s"]:.0f} s')
  print(f'params: {result["source"]}; median of {args.reps} calls; CFG on (doubled batch); '
        f'RTF = batch x clip seconds / wall seconds\n')
  for name, c in configs.items():
    print(f'- {name}: {c["clip_s"]:.3f} s clips; {c["description"]}')
  print()
  print(_fmt_rows(rows))
  print('\ncompile = first call - median call; a+b CPU s = process CPU seconds of one a+b call '
        '(steadier than wall time on a shared machine); calls = timed calls behind each median.')
  print('Targets: ' + TARGETS)
  for t in result['targets']:
    print(f'- {t}')
  return 0
