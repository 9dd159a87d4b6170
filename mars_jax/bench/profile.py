"""Where a step's time goes: per-op profiles of the train steps and the sampler, by category.

For each part it compiles the program the pipeline runs (the engine's jitted train step, the
Generator's two sampling programs), times it (median wall seconds after warm-up), traces a few
more calls with jax.profiler, and maps every op the trace shows back to the HLO instruction it ran
(the compiled module's text: op_name metadata = the model code's name stack). Ops are summed into
categories (matmuls, attention, convolutions, norms and other elementwise work, loss, optimizer,
the layer scan's slicing and stacking, the frozen tokenizer, ...).

Parts (default: all):
  tok_tiny    tokenizer stage step, configs/tiny.py, batch 16
  var_tiny    autoregressor stage step, configs/tiny.py (depth 3, width 128, 85 tokens), batch 32
  var_mid     autoregressor stage step at a mid shape: configs/base.py's VAR cut to depth 8,
              width 512, 8 heads (scales 1..16 = 680 tokens, vocab 4096), float32, batch 4
  sample_tiny the Generator at configs/tiny.py, batch 64: tokens -> spectrogram, Griffin-Lim

Achieved FLOP/s is quoted against this machine's matmul rate measured in the same run (a float32
n^3 product; --matmul-n). FLOPs per step: XLA's cost analysis, except the VAR, counted
analytically (`bench.gpu.var_model_flops`: XLA sees one body of the scanned blocks).

Run:
  python -m mars_jax.bench profile [--parts var_tiny,var_mid] [--steps 5] [--out DIR]
                                   [--set autoregressor.remat=dots ...] [--json]
Writes DIR/<part>/ (the jax.profiler trace, ops.tsv: every op with its ms a call, category and
op_name, the compiled modules' HLO text) and DIR/profile.json; prints a markdown table of
category shares.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

from mars_jax.bench import machine as machine_lib

PARTS = ('tok_tiny', 'var_tiny', 'var_mid', 'sample_tiny')
TRACED_CALLS = 3

# (category, test on (op_name, hlo op)), first match wins. op_name is the model code's name
# stack (e.g. 'jit(step)/transpose(jvp(VAR))/while/body/closed_call/blocks/attn/...').
_ATTN_DOTS = ('bhqd,bhkd->bhqk', 'bhqk,bhkd->bhqd')
CATEGORIES = (
    ('frozen tokenizer (teacher inputs)',
     lambda n, op: 'Tokenizer.encode_tokens' in n or 'idx_to_teacher_inputs' in n),
    ('attention QK^T / AV', lambda n, op: any(d in n for d in _ATTN_DOTS)
     or 'dot_product_attention' in n),
    ('attention softmax & mask', lambda n, op: '/attn/' in n and re.search(
        r'/(reduce_max|reduce_sum|exp|div|sub|select_n|_where|softmax)', n) is not None),
    ('convolutions', lambda n, op: 'conv_general_dilated' in n or n == '(convolution)'),
    ('matmuls (projections, MLP, head)', lambda n, op: n.endswith('dot_general') or n == '(dot)'),
    ('quantizer (nearest code, scales)', lambda n, op: 'quant' in n.lower()),
    ('loss', lambda n, op: 'log_softmax' in n or 'take_along_axis' in n
     or 'cross_entropy' in n),
    ('layer scan: slices, stacking, copies', lambda n, op: 'dynamic_slice' in n
     or 'dynamic_update_slice' in n or n.endswith('/while')
     or (not n and (op.startswith(('copy', 'wrapped_broadcast', 'while', 'bitcast'))))),
    ('norms, AdaLN, GELU, residuals (elementwise)', lambda n, op: re.search(
        r'(VAR|Tokenizer|encoder|decoder|blocks|Norm|Block)', n) is not None),
    ('Griffin-Lim / STFT', lambda n, op: re.search(r'(fft|griffin|stft)', n, re.I) is not None),
    ('optimizer, clipping, NaN guard', lambda n, op: n.startswith('jit(step)/')),
)
OTHER = 'other'


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def categorise(op_name: str, hlo_op: str) -> str:
  for name, test in CATEGORIES:
    if test(op_name, hlo_op):
      return name
  return OTHER


def op_names(hlo_text: str) -> dict:
  """{instruction name: op_name metadata ('' if none)} of a compiled module's text. A fusion
  that contains a dot or a convolution is named by it (XLA names a fusion by its root, so a
  matmul fused with the softmax after it would otherwise count as the softmax)."""
  heavy, own, calls = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    head = re.match(r'(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$', line)
    if head:
      computation = head.group(1)
      continue
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if not m:
      continue
    o = re.search(r'op_name="([^"]*)"', line)
    kind = re.search(r' (dot|convolution)\(', line)
    # A dot or convolution without metadata (e.g. a weight gradient) is named by its kind.
    name = o.group(1) if o else (f'({kind.group(1)})' if kind else '')
    own[m.group(1)] = name
    if computation and kind:
      heavy.setdefault(computation, name)
    c = re.search(r'calls=%?([\w.\-]+)', line)
    if c:
      calls[m.group(1)] = c.group(1)
  return {name: heavy.get(calls.get(name), op) for name, op in own.items()}


def trace_ops(trace_dir: str, modules: dict, calls: int) -> list:
  """Per-op rows from the Perfetto trace jax.profiler wrote under `trace_dir`: the ops of the
  given modules ({hlo module name: op_names()}), their summed duration per call (ms)."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
  if not files:
    raise RuntimeError(f'no Perfetto trace under {trace_dir}')
  with gzip.open(files[-1]) as f:
    events = json.load(f)['traceEvents']
  dur = collections.Counter()
  for e in events:
    args = e.get('args') or {}
    mod, op = args.get('hlo_module'), args.get('hlo_op')
    if e.get('ph') == 'X' and mod in modules and op is not None:
      dur[(mod, op)] += float(e['dur'])
  rows = []
  for (mod, op), us in dur.items():
    name = modules[mod].get(op, '')
    rows.append({'module': mod, 'op': op, 'ms': us / 1e3 / calls, 'op_name': name,
                 'category': categorise(name, op), 'backward': 'transpose(' in name})
  rows.sort(key=lambda r: -r['ms'])
  return rows


def summarise(rows: list) -> dict:
  total = sum(r['ms'] for r in rows) or 1.0
  by = collections.Counter()
  for r in rows:
    by[r['category']] += r['ms']
  return {'op_ms': total, 'categories': {k: {'ms': v, 'share': v / total}
                                         for k, v in by.most_common()},
          'backward_share': sum(r['ms'] for r in rows if r['backward']) / total}


def _write_ops(rows, path):
  with open(path, 'w') as f:
    f.write('ms_per_call\tcategory\tmodule\top\top_name\n')
    for r in rows:
      f.write(f'{r["ms"]:.4f}\t{r["category"]}\t{r["module"]}\t{r["op"]}\t{r["op_name"]}\n')


def save_modules(compiled_programs, trace_dir) -> dict:
  """{module name: op_names} of the compiled programs; each module's HLO text saved beside the
  trace (<module>.hlo.txt), where ops.tsv's op names can be looked up."""
  out = {}
  for compiled in compiled_programs:
    text = compiled.as_text()
    name = module_name(text)
    with open(os.path.join(trace_dir, f'{name}.hlo.txt'), 'w') as f:
      f.write(text)
    out[name] = op_names(text)
  return out


def module_name(hlo_text: str) -> str:
  m = re.search(r'HloModule ([\w.\-]+)', hlo_text)
  return m.group(1) if m else ''


def part_config(part, sets=()):
  """The part's config, then the `--set FIELD=VALUE` overrides."""
  from mars_jax.bench import ablation
  from mars_jax.bench import tokenizer as tok_bench
  if part in ('tok_tiny', 'var_tiny', 'sample_tiny'):
    c = tok_bench.load_config('tiny')
  else:                                 # var_mid
    c = tok_bench.load_config('base')
    c.autoregressor.depth, c.autoregressor.width, c.autoregressor.heads = 8, 512, 8
    for stage in ('tokenizer', 'autoregressor'):
      c[stage].train.compute_dtype = 'float32'
  return ablation.apply_sets(c, sets)


def profile_train_step(part, out_dir, steps, warmup, sets=()):
  import jax
  from mars_jax.bench import gpu as gpu_bench
  from mars_jax.bench import tokenizer as tok_bench
  config = part_config(part, sets)
  stage, batch = {'tok_tiny': ('tokenizer', 16), 'var_tiny': ('autoregressor', 32),
                  'var_mid': ('autoregressor', 4)}[part]
  make = gpu_bench.var_task if stage == 'autoregressor' else tok_bench.tokenizer_task
  _log(f'[{part}] {stage} step, batch {batch}: compiling ...')
  step = tok_bench.Step(config, batch, stage=stage, make=make)
  trace_dir = os.path.join(out_dir, part)
  times = step.time_steps(warmup=warmup, steps=steps, profile_dir=trace_dir)
  flops = (gpu_bench.var_model_flops(step.config, step.shapes, batch)
           if stage == 'autoregressor' else tok_bench.flops_of(step.compiled))
  modules = save_modules([step.compiled], trace_dir)
  rows = trace_ops(trace_dir, modules, TRACED_CALLS)
  _write_ops(rows, os.path.join(trace_dir, 'ops.tsv'))
  med = statistics.median(times)
  del step
  jax.clear_caches()
  return {'part': part, 'stage': stage, 'batch': batch, 'step_s': med, 'step_s_all': times,
          'flops': flops, 'flops_per_s': flops / med if flops else None,
          'top_ops': rows[:15], **summarise(rows)}


def profile_sampling(part, out_dir, steps, warmup, sets=()):
  import jax
  from mars_jax import sample as sample_lib
  from mars_jax.bench import sampling as sampling_bench
  config = part_config(part, sets)
  batch = 64
  gen = sampling_bench.random_generator(config)
  bench = sampling_bench.Bench(gen, reps=steps, rep_seconds=60.0)
  args = bench.args(batch)
  _log(f'[{part}] sampling, batch {batch}: compiling ...')
  # The Generator's two programs, compiled once: the timed and traced calls run exactly the
  # executables whose HLO names the ops (a compiled program takes only the dynamic arguments).
  spec_c = gen.spectrogram_fn.lower(*args).compile()
  dynamic = [a for i, a in enumerate(args) if i not in sample_lib.SPEC_STATIC_ARGNUMS]
  audio_c = gen.audio_fn.lower(spec_c(*dynamic)[0]).compile()

  def once():
    return jax.block_until_ready(audio_c(spec_c(*dynamic)[0]))

  for _ in range(warmup):
    once()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    once()
    times.append(time.perf_counter() - t0)
  trace_dir = os.path.join(out_dir, part)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(TRACED_CALLS):
      once()
  modules = save_modules([spec_c, audio_c], trace_dir)
  rows = trace_ops(trace_dir, modules, TRACED_CALLS)
  audio_module = list(modules)[-1]   # save_modules keys its dict in the order it was given
  for r in rows:   # the whole second program is Griffin-Lim (its ops carry no model names)
    if r['module'] == audio_module:
      r['category'] = 'Griffin-Lim / STFT'
  _write_ops(rows, os.path.join(trace_dir, 'ops.tsv'))
  med = statistics.median(times)
  by_module = collections.Counter()
  for r in rows:
    by_module[r['module']] += r['ms']
  return {'part': part, 'stage': 'sample', 'batch': batch, 'step_s': med, 'step_s_all': times,
          'rtf': batch * bench.clip_s / med, 'module_ms': dict(by_module), 'flops': None,
          'flops_per_s': None, 'top_ops': rows[:15], **summarise(rows)}


def print_table(results, matmul, mach):
  print(f'machine: {mach}')
  print(f'matmul peak measured here: float32 {matmul["n"]}^3, '
        f'{matmul["flops_per_s"] / 1e9:.0f} GFLOP/s')
  print()
  print('| part | batch | step s (median) | GFLOP/step | GFLOP/s | of matmul peak | '
        'op time / wall | backward share |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    fl, rate = r['flops'], r['flops_per_s']
    gflop = '-' if not fl else f'{fl / 1e9:.1f}'
    gflops = '-' if not fl else f'{rate / 1e9:.0f}'
    of_peak = '-' if not fl else f'{100 * rate / matmul["flops_per_s"]:.0f}%'
    print(f'| {r["part"]} | {r["batch"]} | {r["step_s"]:.3f} | {gflop} | {gflops} | {of_peak} | '
          f'{r["op_ms"] / 1e3 / r["step_s"]:.2f} | {100 * r["backward_share"]:.0f}% |')
  cats = [c for c, _ in CATEGORIES] + [OTHER]
  print()
  print('| category | ' + ' | '.join(r['part'] for r in results) + ' |')
  print('|---|' + '---|' * len(results))
  for c in cats:
    cells = []
    for r in results:
      v = r['categories'].get(c)
      cells.append('' if v is None or v['share'] < 0.005 else f'{100 * v["share"]:.0f}%')
    if any(cells):
      print(f'| {c} | ' + ' | '.join(cells) + ' |')


def main(argv=None):
  p = argparse.ArgumentParser(prog='mars_jax.bench profile', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--parts', default=','.join(PARTS), help=f'any of {",".join(PARTS)}')
  p.add_argument('--steps', type=int, default=5, help='timed calls (median)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls first')
  p.add_argument('--matmul-n', type=int, default=1024, help='side of the float32 peak matmul')
  p.add_argument('--out', default='profile_out', help='traces, ops.tsv and profile.json here')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='config override for every part, e.g. autoregressor.remat=dots')
  p.add_argument('--json', action='store_true', help='one JSON document on stdout, no tables')
  args = p.parse_args(argv)
  parts = [x for x in args.parts.split(',') if x]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    p.error(f'unknown part(s) {", ".join(unknown)}; choose from {", ".join(PARTS)}')
  import jax.numpy as jnp
  from mars_jax.bench import gpu as gpu_bench
  os.makedirs(args.out, exist_ok=True)
  mach = machine_lib.describe()
  _log(f'machine: {mach}')
  matmul = gpu_bench.measure_matmul(args.matmul_n, jnp.float32, reps=5, calls=5, warm_s=0.5)
  results = []
  for part in parts:
    fn = profile_sampling if part.startswith('sample') else profile_train_step
    results.append(fn(part, args.out, args.steps, args.warmup, args.set))
  doc = {'machine': mach, 'sets': args.set, 'machine_end_load': machine_lib.load_average(),
         'matmul': matmul, 'results': results}
  with open(os.path.join(args.out, 'profile.json'), 'w') as f:
    json.dump(doc, f, indent=1)
  if args.json:
    print(json.dumps(doc, indent=1))
  else:
    print_table(results, matmul, mach)
    print(f'\nper-op tables: {args.out}/<part>/ops.tsv; traces (Perfetto) beside them')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
