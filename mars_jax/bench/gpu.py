"""One-call accelerator benchmark: the base config's train steps and sampling, in minutes.

Measures, in one process, at configs/base.py (bf16 compute, as the config says):
  matmul     the chip's achieved dense matmul rate (bf16 8192^3 on a GPU), beside the datasheet
             peak that MFU is quoted against (both named in the output);
  tokenizer  the tokenizer stage's jitted train step (engine step: AdamW, code re-seeding, guard):
             compile s, median step s, FLOPs from the compiled cost analysis, MFU, XLA's memory
             analysis and the device's peak bytes in use;
  var        the same for the autoregressor stage's step (the frozen tokenizer's encoder runs
             inside it, as in training), its FLOPs counted analytically (`var_model_flops`);
  sampling   the Generator's two programs at batch 1, 8, 64 with random weights: tokens ->
             spectrogram (CFG on) and Griffin-Lim, alone and together: compile s, median s,
             real-time factor (batch x clip seconds / wall seconds).
Each part is timed with block_until_ready after warm-up; a part that fails (say, out of memory)
is recorded with its error and the rest still run.

Run:
  python -m mars_jax.bench gpu [--out FILE] [--tok-batch 32] [--var-batch 64]
  python -m mars_jax.bench gpu --smoke      # the same code at tiny shapes, on CPU, < 1 minute
Prints a markdown table, then one JSON object on the last line (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

from mars_jax.bench import machine as machine_lib
from mars_jax.bench import sampling as sampling_bench
from mars_jax.bench import tokenizer as tok_bench


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def device_peak_bytes():
  """The device's peak bytes in use so far (None where the backend keeps no statistics)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  value = stats.get('peak_bytes_in_use')
  return int(value) if value is not None else None


def measure_matmul(n, dtype, reps=5, calls=20, warm_s=1.0):
  """Achieved FLOP/s of an n x n x n matmul on random data: `calls` back-to-back products per
  timing (one sync), median of `reps`, after `warm_s` seconds of warm-up (clocks ramp up)."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < warm_s:
    jax.block_until_ready(f(a, b))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [f(a, b) for _ in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / calls)
  med = statistics.median(times)
  return {'n': n, 'dtype': jnp.dtype(dtype).name, 'seconds': med, 'flops_per_s': 2 * n ** 3 / med}


def var_model_flops(config, shapes, batch):
  """Analytic FLOPs of one VAR train step (forward + backward = 3 x forward), as MaxText counts
  model FLOPs: the per-token matmuls (attention projections, MLP, word embedding, head) and the
  L x L attention products. The per-note AdaLN and the frozen encoder are left out (< 2%).
  XLA's cost analysis counts the body of the scanned blocks once, so it cannot serve here."""
  a = config.autoregressor
  c, depth = int(a.width or 64 * a.depth), int(a.depth)
  tokens, vocab, code = shapes.num_tokens, int(config.tokenizer.codebook_size), shapes.latent[2]
  per_token = depth * (4 + 2 * float(a.mlp_ratio)) * c * c + c * vocab + code * c
  attention = depth * 4 * tokens * tokens * c                     # QK^T and AV, per note
  return 3 * batch * (2 * tokens * per_token + attention)


def var_task(config, shapes, rows):
  """(Task, model, local batch) of the autoregressor stage, its frozen tokenizer random; with
  autoregressor.token_cache on, the batch's own tokens are the cached table."""
  import jax
  import numpy as np
  from flax.linen import meta
  from mars_jax.stages import autoregressor as ar_stage
  from mars_jax.stages import token_table
  from mars_jax.stages import tokenizer as tok_stage
  from mars_jax.train import partitioning

  tok_task, tok_model = tok_stage.make_task(config, shapes)
  image = np.zeros((rows,) + tuple(shapes.image), np.float32)
  tok_params = meta.unbox(jax.jit(tok_task.init)(jax.random.PRNGKey(1), {'image': image}))
  # Frozen params ride along as jit arguments: replicated over the mesh the step runs on.
  mesh = partitioning.make_mesh(config)
  tok_params = jax.device_put(tok_params, partitioning.replicated(mesh))
  n_inst = len(sampling_bench.instrument_names(config))
  local = {'image': image, 'pitch': np.zeros((rows,), np.int32),
           'instrument': np.zeros((rows,), np.int32)}
  tokens = None
  if config.autoregressor.token_cache != 'off':   # as the stage runs it: targets from the table
    tokens, local['index'] = token_table.of_batch(tok_model, tok_params, image, mesh)
  task, model = ar_stage.make_task(config, shapes, n_inst, tok_model, tok_params, tokens)
  return task, model, local


def train_step(config, stage, batch, make, peak, warmup, steps, profile_dir=''):
  """Compile + time one stage's train step; a dict of its numbers."""
  _log(f'[{stage}] batch {batch}: compiling ...')
  step = tok_bench.Step(config, batch, stage=stage, make=make)
  _log(f'[{stage}] compiled in {step.compile_s:.1f} s; {step.param_count / 1e6:.1f} M params')
  mem = step.memory()
  from mars_jax.train import engine
  limit = engine.device_memory_limit()
  warning = engine.memory_warning(stage, mem, limit)
  if warning:
    _log(f'[{stage}] WARNING: {warning}')
  times = step.time_steps(warmup=warmup, steps=steps, profile_dir=profile_dir)
  med = statistics.median(times)
  flops = tok_bench.flops_of(step.compiled)
  if stage == 'autoregressor':   # the scan over blocks hides all but one block from XLA's count
    flops = var_model_flops(config, step.shapes, batch)
  out = {'batch': batch, 'params': step.param_count,
         'compute_dtype': config[stage].train.compute_dtype, 'compile_s': step.compile_s,
         'step_s': med, 'step_s_all': times, 'examples_per_s': batch / med,
         'flops_per_step': flops, 'flops_per_s': flops / med if flops else None,
         'mfu': flops / med / peak if (flops and peak) else None,
         'xla_bytes': mem.get('total_minus_alias_bytes'),
         'device_peak_bytes': device_peak_bytes(), 'device_limit_bytes': limit}
  del step
  return out


def sampling_rows(config, batches, reps):
  """The Generator's programs at each batch (random weights): compile, seconds, RTF."""
  gen = sampling_bench.random_generator(config)
  bench = sampling_bench.Bench(gen, reps, rep_seconds=20.0)
  rows = []
  for b in batches:
    _log(f'[sampling] batch {b} ...')
    r = bench.run(b)
    rows.append({k: r[k] for k in ('batch', 'compile_a_s', 'compile_b_s', 'a_s', 'b_s', 'ab_s',
                                   'rtf_a', 'rtf_b', 'rtf_ab')})
    rows[-1]['device_peak_bytes'] = device_peak_bytes()
    _log(f'[sampling] batch {b}: RTF tokens->spec {r["rtf_a"]:.0f}x, with Griffin-Lim '
         f'{r["rtf_ab"]:.0f}x, Griffin-Lim alone {r["rtf_b"]:.0f}x')
  return {'clip_s': bench.clip_s, 'description': sampling_bench.describe_config(gen),
          'rows': rows}


def _guarded(name, fn, result, out=''):
  """Runs fn() into result[name]; an error is recorded (type, message, traceback) and skipped.
  With `out`, the result so far is written there after each part (a killed run keeps them)."""
  t0 = time.perf_counter()
  try:
    result[name] = fn()
  except Exception as e:  # a benchmark reports every part it could measure
    _log(f'[{name}] FAILED: {type(e).__name__}: {e}')
    result[name] = {'error': f'{type(e).__name__}: {str(e)[:2000]}',
                    'traceback': traceback.format_exc()[-4000:]}
  result[name]['wall_s'] = time.perf_counter() - t0
  if out:
    with open(out, 'w') as f:
      f.write(json.dumps(result) + '\n')


def _fmt(v, spec='.3f', none='n/a'):
  return none if v is None else format(v, spec)


def _gib(v):
  return 'n/a' if v is None else f'{v / 2**30:.1f} GiB'


def table(result) -> str:
  m = result['machine']
  lines = [f'machine: {m["describe"]}',
           f'peak used for MFU: {_fmt(m["peak_flops"], ".3g")} FLOP/s ({m["peak_source"]}); '
           f'measured matmul: {_fmt(result.get("matmul", {}).get("flops_per_s"), ".3g")} '
           f'FLOP/s ({result.get("matmul", {}).get("dtype", "?")} '
           f'{result.get("matmul", {}).get("n", "?")}^3)', '',
           '| train step | batch | dtype | params | compile s | step s | examples/s | '
           'TFLOP/step | TFLOP/s | MFU % | XLA bytes | device peak |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for stage in [k for k in result if k == 'tokenizer' or k.startswith('var')]:
    r = result[stage]
    if 'error' in r or not r:
      lines.append(f'| {stage} | {r.get("error", "not run")[:200]} |||||||||||')
      continue
    fl = r['flops_per_step']
    label = stage if 'attention' not in r else f'{stage} ({r["attention"]} attention)'
    lines.append(
        f'| {label} | {r["batch"]} | {r["compute_dtype"]} | {r["params"] / 1e6:.1f} M | '
        f'{r["compile_s"]:.1f} | {r["step_s"]:.4f} | {r["examples_per_s"]:.1f} | '
        f'{_fmt(fl and fl / 1e12, ".3f")} | '
        f'{_fmt(r["flops_per_s"] and r["flops_per_s"] / 1e12, ".1f")} | '
        f'{_fmt(r["mfu"] and 100 * r["mfu"], ".1f")} | {_gib(r["xla_bytes"])} | '
        f'{_gib(r["device_peak_bytes"])} |')
  s = result.get('sampling', {})
  lines += ['', f'sampling ({s.get("description", "")}; clip {_fmt(s.get("clip_s"), ".2f")} s)',
            '| batch | compile spec / GL s | tokens->spec s | Griffin-Lim s | both s | '
            'RTF spec | RTF GL alone | RTF spec+GL |', '|---|---|---|---|---|---|---|---|']
  if 'error' in s:
    lines.append(f'| {s["error"]} |||||||')
  for r in s.get('rows', []):
    lines.append(f'| {r["batch"]} | {r["compile_a_s"]:.1f} / {r["compile_b_s"]:.1f} | '
                 f'{r["a_s"]:.4f} | {r["b_s"]:.4f} | {r["ab_s"]:.4f} | {r["rtf_a"]:.0f}x | '
                 f'{r["rtf_b"]:.0f}x | {r["rtf_ab"]:.0f}x |')
  lines.append(f'\ntotal {result["total_s"]:.0f} s')
  return '\n'.join(lines)


def main(argv):
  p = argparse.ArgumentParser(prog='python -m mars_jax.bench gpu', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='base',
                 help='configs/NAME.py (default base; tiny with --smoke)')
  p.add_argument('--smoke', action='store_true',
                 help='tiny shapes and batches (CPU-sized): checks the code path, measures nothing')
  p.add_argument('--tok-batch', type=int, default=0,
                 help='tokenizer global batch (0: 32; smoke: max(2, devices))')
  p.add_argument('--var-batch', default='', help='VAR global batches, e.g. 64,128 (default 64; '
                 'smoke: max(2, devices))')
  p.add_argument('--profile', default='', help='trace 3 steps of each train step into DIR/NAME')
  p.add_argument('--batches', default='', help='sampling batches (default 1,8,64; smoke 1,2)')
  p.add_argument('--steps', type=int, default=0, help='timed train steps (default 10; smoke 2)')
  p.add_argument('--attention', default='',
                 help="VAR step once per autoregressor.attention in this list, e.g. einsum,cudnn "
                      "(default: the config's only)")
  p.add_argument('--parts', default='matmul,tokenizer,var,sampling')
  p.add_argument('--out', default='', help='also write the JSON object to this file')
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  t_start = time.perf_counter()
  smoke = args.smoke
  config = sampling_bench.load_config('tiny' if smoke and args.config == 'base' else args.config)
  dev = jax.devices()[0]
  peak = tok_bench.peak_flops(dev.device_kind) if dev.platform == 'gpu' else None
  result = {'machine': {'describe': machine_lib.describe(), 'platform': dev.platform,
                        'device_kind': dev.device_kind, 'peak_flops': peak,
                        'peak_source': ('datasheet dense bf16 for ' + dev.device_kind) if peak
                        else 'no known peak for this device: MFU n/a'},
            'config': args.config if not smoke else 'tiny (smoke)', 'smoke': smoke}
  parts = set(args.parts.split(','))
  small = max(2, jax.device_count())   # smoke: the smallest batch every device gets rows of
  tok_batch = args.tok_batch or (small if smoke else 32)
  var_batches = [int(b) for b in (args.var_batch or (str(small) if smoke else '64')).split(',')]
  prof = lambda name: f'{args.profile}/{name}' if args.profile else ''
  steps = args.steps or (2 if smoke else 10)
  batches = [int(b) for b in (args.batches or ('1,2' if smoke else '1,8,64')).split(',')]
  if 'matmul' in parts:
    n, dtype = (256, jnp.float32) if smoke else (8192, jnp.bfloat16)
    _guarded('matmul', lambda: measure_matmul(n, dtype), result, args.out)
  if 'tokenizer' in parts:
    _guarded('tokenizer', lambda: train_step(config, 'tokenizer', tok_batch,
                                             tok_bench.tokenizer_task, peak, 2, steps,
                                             prof('tokenizer')), result, args.out)
  if 'var' in parts:
    variants = [(a, b) for a in (args.attention.split(',') if args.attention else [''])
                for b in var_batches]
    for i, (attention, batch) in enumerate(variants):
      c = config.copy_and_resolve_references()
      if attention:
        c.autoregressor.attention = attention
      name = 'var' if i == 0 else f'var_{c.autoregressor.attention}_b{batch}'
      _guarded(name, lambda c=c, b=batch, n=name: train_step(
          c, 'autoregressor', b, var_task, peak, 2, steps, prof(n) if b == var_batches[0] else ''),
               result, args.out)
      result[name]['attention'] = c.autoregressor.attention
  if 'sampling' in parts:
    _guarded('sampling', lambda: sampling_rows(config, batches, 1 if smoke else 5), result,
             args.out)
  result['total_s'] = time.perf_counter() - t_start
  print(table(result))
  text = json.dumps(result)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  print(text)
  failed = [k for k, v in result.items() if isinstance(v, dict) and 'error' in v]
  return 1 if failed else 0
