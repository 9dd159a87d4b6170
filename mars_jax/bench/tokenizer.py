"""Tokenizer train-step benchmarks: throughput / MFU, and the CMX memory claim.

throughput: the engine's own jitted train step (optimizer, dead-code re-seeding, the non-finite
  guard: everything `engine.train` compiles) at the tiny and base config shapes on random images:
  compile time, examples/s (median of timed steps after warm-up), FLOPs per step from
  `compiled.cost_analysis()` and, on a GPU with a known peak, MFU = flops / step time / peak.
memory: peak memory of ONE base-config train step, from `compiled.memory_analysis()` of the
  compiled executable (compile only, nothing runs), for
    cmx       CMX r=8: 64 x 64 x 64 input, channel_mult (1, 2, 2) -> 16 x 16 latent
              (configs/base.py)
    none      no CMX: the 512 x 512 x 1 spectrogram, with three more down-samplings to reach the
              same 16 x 16 latent. Same widths as `cmx` at the resolutions both share
              (128 @ 64, 256 @ 32 and 16) and 128 at the three extra ones:
              channel_mult (1, 1, 1, 1, 2, 2). This is the cheapest reasonable choice, so the
              ratio none/cmx is a lower bound.
    none_vqgan  the same, with a VQGAN/SD-style pyramid (1, 1, 2, 2, 4, 4) (for reference)
    truncate  a 64 x 64 x 1 crop (lossy ablation), same tokenizer as `cmx` but 1 image channel.
  The paper's claim is none / cmx >= 4 (CMX lets a small tokenizer handle 512 x 512).

Run:
  python -m mars_jax.bench tokenizer throughput [--configs tiny,base] [--batch N] [--steps 5]
  python -m mars_jax.bench tokenizer memory [--batch 8] [--variants cmx,none,none_vqgan,truncate]
  add --json for one JSON document on stdout instead of the markdown tables.
Progress goes to stderr. The step is `engine.TrainStep`, the one `engine.train` compiles.
"""
from __future__ import annotations

from mars_jax.bench import machine as machine_lib
import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

# Dense peak FLOP/s by device_kind substring (first match wins); bf16 tensor-core figures.
PEAK_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100', 989e12),     # SXM
    ('H200', 989e12),
    ('GH200', 989e12),
    ('A100', 312e12),
    ('L4', 121e12),
    ('A10', 125e12),
)

MEMORY_VARIANTS = {
    # name: (cmx.mode, channel_mult or None = keep the config's)
    'cmx': ('cmx', None),
    'none': ('none', (1, 1, 1, 1, 2, 2)),
    'none_vqgan': ('none', (1, 1, 2, 2, 4, 4)),
    'truncate': ('truncate', None),
}


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def load_config(name):
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def machine() -> dict:
  import jax
  cpu = machine_lib.cpu_name()
  dev = jax.devices()[0]
  load = machine_lib.load_average()
  return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'backend': jax.default_backend(),
          'device_kind': dev.device_kind, 'num_devices': jax.device_count(),
          'jax': jax.__version__, 'loadavg': load, 'date': str(datetime.date.today())}


def _machine_str(m):
  load = m['loadavg'] + (f' (start) -> {m["loadavg_end"]} (end)' if 'loadavg_end' in m else '')
  return (f'{m["cpu"]}, {m["cpu_count"]} cores; {m["backend"]}: {m["num_devices"]} x '
          f'{m["device_kind"]}; load avg 1/5/15 min {load}')


def peak_flops(device_kind: str):
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def flops_of(compiled):
  """FLOPs of one call of a compiled program, from XLA's cost analysis (None if unknown)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get('flops')
  return float(value) if value is not None and value >= 0 else None


def tokenizer_task(config, shapes, rows):
  """(Task, model, local batch of `rows` zero images) of the tokenizer stage."""
  from mars_jax.stages import tokenizer as tok_stage
  task, model = tok_stage.make_task(config, shapes)
  return task, model, {'image': np.zeros((rows,) + tuple(shapes.image), np.float32)}


class Step:
  """A stage's train step, compiled the way `engine.train` compiles it.

  make(config, shapes, rows) -> (Task, model, local zero batch of `rows` rows) builds the stage's
  task (default: the tokenizer); random batches of the same structure are timed.
  """

  def __init__(self, config, batch, stage='tokenizer', make=tokenizer_task):
    import flax.linen as nn
    import jax
    from mars_jax import config as config_lib
    from mars_jax.train import engine
    from mars_jax.train import partitioning as part

    config = config.copy_and_resolve_references()
    config[stage].train.batch_size = batch
    self.config, self.batch, self.stage = config, batch, stage
    self.shapes = config_lib.derive(config)
    devices = jax.devices()
    config_lib.validate_batch(config, stage, len(devices), jax.process_count())
    self.mesh = part.make_mesh(config)
    self.rules = part.logical_rules(config)
    task, self.model, self.local = make(config, self.shapes, batch // jax.process_count())
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.train_step = engine.TrainStep(task, config, stage, self.mesh,
                                         part.abstract_batch(self.local, self.mesh))
      t0 = time.perf_counter()
      self.compiled = self.train_step.compile()
      self.compile_s = time.perf_counter() - t0
    self.param_count = sum(int(np.prod(x.shape))
                           for x in jax.tree.leaves(self.train_step.abstract.params))

  def memory(self) -> dict:
    from mars_jax.train import engine
    return engine.step_memory(self.compiled)

  def time_steps(self, warmup=2, steps=5, profile_dir=''):
    """Runs the compiled step on random images; returns the per-step wall times (s). With
    `profile_dir`, 3 more steps are traced there (jax.profiler, with a Perfetto trace)."""
    import flax.linen as nn
    import jax
    from mars_jax.train import partitioning as part
    rng = np.random.default_rng(0)
    local = {k: (rng.uniform(-1, 1, v.shape).astype(v.dtype) if v.dtype.kind == 'f'
                 else rng.integers(0, 2, v.shape).astype(v.dtype))   # ids 0/1 exist in any vocab
             for k, v in self.local.items()}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      batch = part.put_batch(local, self.mesh)
      state = self.train_step.init(batch)
      jax.block_until_ready(state)
      times = []
      for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = self.train_step.step(state, batch)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        if i >= warmup:
          times.append(dt)
        _log(f'  step {i}{" (warm-up)" if i < warmup else ""}: {dt:.3f}s '
             f'loss {float(metrics["loss"]):.4f}')
      if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
          for _ in range(3):
            state, metrics = self.train_step.step(state, batch)
          jax.block_until_ready((state, metrics))
    return times


def _fmt_bytes(n):
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def _dtype(config, override):
  if override != 'config':
    config.tokenizer.train.compute_dtype = override
  return config.tokenizer.train.compute_dtype


def run_throughput(args, mach):
  rows = []
  for name in args.configs.split(','):
    config = load_config(name)
    dtype = _dtype(config, args.dtype)
    batch = args.batch or (config.tokenizer.train.batch_size if mach['backend'] != 'cpu'
                           else {'tiny': 16}.get(name, 4))
    _log(f'throughput: {name} batch {batch} {dtype}: compiling ...')
    step = Step(config, batch)
    _log(f'  compiled in {step.compile_s:.1f}s; {step.param_count / 1e6:.2f}M params')
    times = step.time_steps(warmup=args.warmup, steps=args.steps)
    med = statistics.median(times)
    flops = flops_of(step.compiled)
    peak = peak_flops(mach['device_kind']) if mach['backend'] == 'gpu' else None
    mfu = flops / med / (peak * mach['num_devices']) if (flops and peak) else None
    rows.append({'config': name, 'batch': batch, 'image': list(step.shapes.image),
                 'latent': list(step.shapes.latent),
                 'channel_mult': list(config.tokenizer.channel_mult),
                 'compute_dtype': dtype, 'params': step.param_count,
                 'compile_s': step.compile_s, 'step_s_median': med, 'step_s_all': times,
                 'examples_per_s': batch / med, 'flops_per_step': flops,
                 'flops_per_s': flops / med if flops else None,
                 'peak_flops': peak, 'mfu': mfu})
    del step
  return rows


def print_throughput(rows, mach):
  print(f'machine: {_machine_str(mach)}; {mach["date"]}; jax {mach["jax"]}')
  print('| machine | date | config | image -> latent | dtype | params | batch | compile s | '
        'step s (median) | examples/s | GFLOP/step | TFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  short = (f'{mach["cpu_count"]}-core {mach["backend"]} {mach["device_kind"]} '
           f'(load {mach["loadavg"]})')
  for r in rows:
    fl, med = r['flops_per_step'], r['step_s_median']
    gflop = 'n/a' if not fl else f'{fl / 1e9:.1f}'
    tflops = 'n/a' if not fl else f'{fl / med / 1e12:.3f}'
    mfu = 'n/a' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%'
    print(f'| {short} | {mach["date"]} | {r["config"]} | '
          f'{"x".join(map(str, r["image"]))} -> {"x".join(map(str, r["latent"][:2]))} | '
          f'{r["compute_dtype"]} | {r["params"] / 1e6:.2f}M | {r["batch"]} | '
          f'{r["compile_s"]:.1f} | {med:.3f} | {r["examples_per_s"]:.2f} | '
          f'{gflop} | {tflops} | {mfu} |')


def run_memory(args, mach):
  rows = []
  for variant in args.variants.split(','):
    mode, mult = MEMORY_VARIANTS[variant]
    config = load_config(args.memory_config)
    dtype = _dtype(config, args.dtype)
    config.cmx.mode = mode
    if mult is not None:
      config.tokenizer.channel_mult = mult
    batch = args.batch or 8
    _log(f'memory: {variant} (cmx.mode={mode}, channel_mult={tuple(config.tokenizer.channel_mult)})'
         f' batch {batch} {dtype}: compiling ...')
    step = Step(config, batch)
    mem = step.memory()
    _log(f'  compiled in {step.compile_s:.1f}s: {mem}')
    rows.append({'variant': variant, 'cmx_mode': mode, 'image': list(step.shapes.image),
                 'latent': list(step.shapes.latent),
                 'channel_mult': list(config.tokenizer.channel_mult),
                 'compute_dtype': dtype, 'batch': batch, 'params': step.param_count,
                 'compile_s': step.compile_s, 'flops_per_step': flops_of(step.compiled), **mem})
    del step
  by = {r['variant']: r for r in rows}
  ratios = {}
  for num, den in (('none', 'cmx'), ('none_vqgan', 'cmx'), ('cmx', 'truncate')):
    if num in by and den in by and by[den].get('total_bytes'):
      ratios[f'{num}/{den}'] = by[num]['total_bytes'] / by[den]['total_bytes']
      ratios[f'{num}/{den} (minus alias)'] = (by[num]['total_minus_alias_bytes']
                                               / by[den]['total_minus_alias_bytes'])
  return rows, ratios


def print_memory(rows, ratios, mach):
  print(f'machine: {_machine_str(mach)}; {mach["date"]}; jax {mach["jax"]}')
  print('| machine | date | variant | input | channel_mult -> latent | dtype | params | batch | '
        'args | outputs | temps | total (temp+arg+out) | total - alias | GFLOP/step | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  short = f'{mach["cpu_count"]}-core {mach["backend"]} {mach["device_kind"]}'
  for r in rows:
    fl = r.get('flops_per_step')
    print(f'| {short} | {mach["date"]} | {r["variant"]} | {"x".join(map(str, r["image"]))} | '
          f'{tuple(r["channel_mult"])} -> {"x".join(map(str, r["latent"][:2]))} | '
          f'{r["compute_dtype"]} | {r["params"] / 1e6:.2f}M | {r["batch"]} | '
          f'{_fmt_bytes(r["argument_size_in_bytes"])} | {_fmt_bytes(r["output_size_in_bytes"])} | '
          f'{_fmt_bytes(r["temp_size_in_bytes"])} | {_fmt_bytes(r["total_bytes"])} | '
          f'{_fmt_bytes(r["total_minus_alias_bytes"])} | '
          f'{"n/a" if not fl else f"{fl / 1e9:.0f}"} | {r["compile_s"]:.1f} |')
  if ratios:
    print()
    print('| ratio | temp+arg+out | minus alias |')
    print('|---|---|---|')
    for key, value in ratios.items():
      if key.endswith('(minus alias)'):
        continue
      print(f'| {key} | {value:.2f}x | {ratios[key + " (minus alias)"]:.2f}x |')
    if 'none/cmx' in ratios:
      ok = ratios['none/cmx'] >= 4
      print(f'\nclaim none/cmx >= 4: {"PASS" if ok else "FAIL"} ({ratios["none/cmx"]:.2f}x)')


def main(argv=None):
  p = argparse.ArgumentParser(prog='mars_jax.bench tokenizer', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('which', nargs='?', default='throughput', choices=('throughput', 'memory', 'all'))
  p.add_argument('--configs', default='tiny,base', help='throughput: configs/<name>.py list')
  p.add_argument('--batch', type=int, default=0,
                 help='global batch (default: throughput tiny 16 / base 4 on CPU, the config\'s '
                      'on GPU; memory 8)')
  p.add_argument('--steps', type=int, default=5, help='throughput: timed steps (median)')
  p.add_argument('--warmup', type=int, default=2, help='throughput: untimed steps first')
  p.add_argument('--dtype', default='config', choices=('config', 'float32', 'bfloat16'),
                 help='override <stage>.train.compute_dtype')
  p.add_argument('--memory-config', default='base', help='memory: the config the variants edit')
  p.add_argument('--variants', default='cmx,none,none_vqgan,truncate',
                 help=f'memory: any of {",".join(MEMORY_VARIANTS)}')
  p.add_argument('--json', action='store_true', help='one JSON document on stdout, no tables')
  args = p.parse_args(argv)

  mach = machine()
  _log(f'machine: {_machine_str(mach)}')
  out = {'machine': mach}
  if args.which in ('throughput', 'all'):
    out['throughput'] = run_throughput(args, mach)
    mach['loadavg_end'] = machine()['loadavg']
    if not args.json:
      print_throughput(out['throughput'], mach)
  if args.which in ('memory', 'all'):
    out['memory'], out['memory_ratios'] = run_memory(args, mach)
    mach['loadavg_end'] = machine()['loadavg']
    if not args.json:
      if args.which == 'all':
        print()
      print_memory(out['memory'], out['memory_ratios'], mach)
  if args.json:
    print(json.dumps(out, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
