"""Train-step time of this checkout against an earlier commit, same shapes, measured in one run.

Each side runs in its own child process with its own code (the earlier commit is extracted with
`git archive` into a temporary folder and put first on PYTHONPATH), building the stage's train
step the way that version's engine compiled it, at the same shapes, on random inputs: compile,
then `--warmup` untimed steps. Both children then stay alive and take turns, a round at a time:
one untimed step and `--steps` timed ones on one side, then the same on the other, the order
swapped each round. A round's two medians share the machine's state of those few seconds, so the
round's speed-up (earlier / this) is free of the drift between minutes that spreads separate
runs by 20-40% on a shared 2-core host; the untimed step keeps what the other process left
behind (freed memory, the kernel's deferred work) off the timed ones. (Turns of single steps
were tried and are biased: each step's leftovers land on the other side's clock.) The rounds'
speed-ups give a geometric mean +- two standard errors, the interval a target is judged by: met
only when the whole interval clears it, not met only when it all falls short, otherwise "not
resolved" (more rounds narrow it). The table also gives each side's median over its rounds.
`--sequential` runs a fresh pair of processes a round instead, one after the other (how this
tool measured before 2026-12-02).

Parts (the shapes of issue 14's measurements):
  var_tiny  autoregressor step: configs/tiny.py's VAR (depth 3, width 128, 4 heads, 85 tokens,
            vocab 256), batch 32, with the frozen tiny tokenizer
  var_mid   autoregressor step: configs/base.py's VAR cut to depth 8, width 512, 8 heads (680
            tokens, vocab 4096), float32, batch 4, with base's frozen tokenizer
  tok_tiny  tokenizer step: configs/tiny.py, batch 16
Each version's autoregressor step runs as its stage does: versions with the token cache
(stages/token_table.py) read the targets from a table of the batch's tokens, earlier ones run
the tokenizer's encoder inside the step (`--set autoregressor.token_cache=off` times that path).

Run:
  python -m mars_jax.bench compare --against 1cba8b4 [--parts var_tiny,var_mid,tok_tiny]
                                   [--rounds 3] [--steps 5] [--set FIELD=VALUE ...]
                                   [--this-env NAME=VALUE ...] [--sequential] [--json]
`--set` overrides apply to this checkout's side only (e.g. autoregressor.remat=dots), so a
setting can be measured against the earlier code as it was; `--this-env` does the same for the
process environment. Both sides otherwise run in this process's environment, which includes
the huge-page malloc that `python -m mars_jax.bench` starts with (mars_jax/allocator.py): a
comparison of code alone. Each version as it ran (the earlier one on glibc's default malloc):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0 python -m mars_jax.bench compare \\
      --this-env GLIBC_TUNABLES=glibc.malloc.hugetlb=1

This file is also the child (`--child PART`): it imports nothing of mars_jax at the top, so the
same file drives whichever version PYTHONPATH points at.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

PARTS = {
    # part: (stage, config file, batch)
    'var_tiny': ('autoregressor', 'tiny', 32),
    'var_mid': ('autoregressor', 'base', 4),
    'tok_tiny': ('tokenizer', 'tiny', 16),
}
TARGETS = {'var_tiny': 1.6, 'var_mid': 1.4}   # issue 14: speed-up over commit 1cba8b4


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def speedup_interval(earlier, this):
  """Per-round speed-ups earlier[i] / this[i] -> (geometric mean, mean - 2 SE, mean + 2 SE),
  on log ratios (a ratio's spread is symmetric in log space). One round: no spread, (r, r, r)."""
  logs = [math.log(e / t) for e, t in zip(earlier, this, strict=True)]
  mean = statistics.fmean(logs)
  se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
  return math.exp(mean), math.exp(mean - 2 * se), math.exp(mean + 2 * se)


def verdict(target, lo, hi):
  """Whether a speed-up interval [lo, hi] meets `target`, claiming nothing the spread hides."""
  if lo >= target:
    return 'met'
  if hi < target:
    return 'not met'
  return 'not resolved'


# --- child: runs inside either version ---------------------------------------------------------


def _load_config(root, name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'cfg_{name}',
                                                os.path.join(root, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _part_config(part, root):
  stage, name, batch = PARTS[part]
  c = _load_config(root, name)
  if part == 'var_mid':
    c.autoregressor.depth, c.autoregressor.width, c.autoregressor.heads = 8, 512, 8
    for s in ('tokenizer', 'autoregressor'):
      c[s].train.compute_dtype = 'float32'
  c[stage].train.batch_size = batch
  return c


def compiled_step(engine, task, config, stage, mesh, rules, batch_abs):
  """(init(batch) -> state, step(state, batch) -> (state, metrics)) as this version's engine
  compiles them: `engine.TrainStep` where it exists, else the engine's earlier free functions."""
  import jax
  if hasattr(engine, 'TrainStep'):
    ts = engine.TrainStep(task, config, stage, mesh, batch_abs)
    ts.compile()
    return ts.init, ts.step
  from mars_jax.train import checkpoint as ckpt                  # the earlier engine (1cba8b4)
  from mars_jax.train import partitioning as part
  tc = config[stage].train
  tx, schedule = engine.make_optimizer(tc, task)
  rng = engine._base_rng(config, stage)
  abstract, shard = engine.state_shardings(task, tx, tc, mesh, rules, rng, batch_abs)
  target = ckpt.abstract_with_shardings(abstract, shard)
  frozen = {} if getattr(task, 'frozen', None) is None else task.frozen
  jitted = jax.jit(engine._step_fn(task, tx, schedule, tc),
                   in_shardings=(shard, {k: v.sharding for k, v in batch_abs.items()},
                                 jax.tree.map(lambda a: a.sharding, frozen)),
                   out_shardings=(shard, part.replicated(mesh)), donate_argnums=0)
  compiled = jitted.lower(target, batch_abs, frozen).compile()
  init = jax.jit(engine._init_fn(task, tx, tc, rng), out_shardings=shard)
  return init, lambda state, batch: compiled(state, batch, frozen)


def child(part, steps, warmup, sets, serve=False):
  """Builds `part`'s step and runs `warmup` untimed steps; then either times `steps` steps or,
  with `serve`, prints READY and, for each 'run N' line on stdin, runs one untimed step and N
  timed ones and prints their times, until 'end'."""
  import resource
  import time
  import flax.linen as nn
  import jax
  import numpy as np
  from flax.linen import meta
  from mars_jax import config as config_lib
  from mars_jax.stages import autoregressor as ar_stage
  from mars_jax.stages import tokenizer as tok_stage
  from mars_jax.train import engine
  from mars_jax.train import partitioning as part_lib

  root = os.getcwd()
  stage, _, batch = PARTS[part]
  config = _part_config(part, root)
  if sets:
    from mars_jax.bench import ablation
    ablation.apply_sets(config, sets)
  shapes = config_lib.derive(config)
  mesh, rules = part_lib.make_mesh(config), part_lib.logical_rules(config)
  rng = np.random.default_rng(0)
  local = {'image': rng.uniform(-1, 1, (batch,) + tuple(shapes.image)).astype(np.float32)}
  tok_task, tok_model = tok_stage.make_task(config, shapes)
  if stage == 'autoregressor':
    tok_params = meta.unbox(jax.jit(tok_task.init)(jax.random.PRNGKey(1), local))
    tok_params = jax.device_put(tok_params, part_lib.replicated(mesh))
    local['pitch'] = rng.integers(0, 2, (batch,)).astype(np.int32)
    local['instrument'] = rng.integers(0, 2, (batch,)).astype(np.int32)
    try:      # versions with the token cache run the step as their stage does: from the table
      from mars_jax.stages import token_table
    except ImportError:
      token_table = None
    if token_table is not None and config.autoregressor.token_cache != 'off':
      tokens, local['index'] = token_table.of_batch(tok_model, tok_params, local['image'], mesh)
      task, _ = ar_stage.make_task(config, shapes, 4, tok_model, tok_params, tokens)
    else:
      task, _ = ar_stage.make_task(config, shapes, 4, tok_model, tok_params)
  else:
    task = tok_task
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch_abs = part_lib.abstract_batch(local, mesh)
    t0 = time.perf_counter()
    init, step = compiled_step(engine, task, config, stage, mesh, rules, batch_abs)
    compile_s = time.perf_counter() - t0
    device_batch = part_lib.put_batch(local, mesh)
    state = jax.block_until_ready(init(device_batch))
    metrics = None

    def timed():
      nonlocal state, metrics
      t0 = time.perf_counter()
      state, metrics = step(state, device_batch)
      jax.block_until_ready((state, metrics))
      return time.perf_counter() - t0

    for _ in range(warmup):
      timed()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)  # page faults, kernel time (allocator.py)
    times, untimed = [], 0
    if serve:
      print('READY', flush=True)
      for line in sys.stdin:   # 'run N': N steps, the first untimed (it absorbs the other
        words = line.split()   # process's leftovers: a freed heap, the kernel's deferred work)
        if not words or words[0] != 'run':
          break
        timed()
        block = [timed() for _ in range(int(words[1]))]
        times += block
        untimed += 1
        print('TIMES ' + json.dumps(block), flush=True)
    else:
      times = [timed() for _ in range(steps)]
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
  import mars_jax
  n = max(len(times) + untimed, 1)   # the faults and kernel time are of every step run
  print('RESULT ' + json.dumps({'part': part, 'compile_s': compile_s, 'times': times,
                                'loss': float(metrics['loss']) if metrics else float('nan'),
                                'minor_faults': (usage1.ru_minflt - usage0.ru_minflt) / n,
                                'kernel_s': (usage1.ru_stime - usage0.ru_stime) / n,
                                'code': os.path.dirname(os.path.abspath(mars_jax.__file__))}),
        flush=True)


# --- driver ------------------------------------------------------------------------------------


def repo_root():
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def extract(rev, dest):
  """The files of commit `rev` of this checkout's git repository, under dest."""
  root = repo_root()
  try:
    archive = subprocess.run(['git', '-C', root, 'archive', '--format=tar', rev],
                             capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    err = getattr(e, 'stderr', b'') or b''
    raise SystemExit(f'--against {rev}: cannot read that commit from the git repository at '
                     f'{root} ({err.decode(errors="replace").strip() or e}); compare needs a git '
                     f'checkout that holds it.')
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
  return dest


def _child_cmd(tree, part, args, sets, extra_env, serve):
  env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.update(extra_env)
  # -P: this file's folder (mars_jax/bench) must not shadow top-level modules in the child.
  cmd = [sys.executable, '-P', os.path.abspath(__file__), '--child', part,
         '--steps', str(args.steps), '--warmup', str(args.warmup)]
  cmd += [f'--set={s}' for s in sets] + (['--serve'] if serve else [])
  return cmd, env


def _result(part, tree, stdout, returncode, stderr):
  line = next((x for x in stdout.splitlines() if x.startswith('RESULT ')), None)
  if returncode != 0 or line is None:
    raise SystemExit(f'{part} in {tree} failed (exit {returncode}):\n{stderr[-3000:]}')
  out = json.loads(line[len('RESULT '):])
  if os.path.realpath(out['code']) != os.path.realpath(os.path.join(tree, 'mars_jax')):
    raise SystemExit(f'{part}: the child imported mars_jax from {out["code"]}, not {tree}')
  return out


def run_child(tree, part, args, sets, extra_env=()):
  """One child, start to end: `--warmup` then `--steps` timed steps (the sequential mode)."""
  cmd, env = _child_cmd(tree, part, args, sets, extra_env, serve=False)
  r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
  return _result(part, tree, r.stdout, r.returncode, r.stderr)


class Server:
  """A child that holds its compiled step and runs a turn of steps each time it is asked."""

  def __init__(self, cmd, tree, env, part):
    self.tree, self.part = tree, part
    self.err = tempfile.TemporaryFile(mode='w+')   # a file, not a pipe: JAX's logs cannot block
    self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)

  def _died(self, waiting_for):
    self.err.seek(0)
    raise SystemExit(f'{self.part} in {self.tree} stopped (exit {self.proc.wait()}) before '
                     f'{waiting_for}:\n{self.err.read()[-3000:]}')

  def _send(self, line):
    try:
      self.proc.stdin.write(line + '\n')
    except BrokenPipeError:
      self._died(repr(line))

  def _line(self, prefix):
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return line
    self._died(prefix.strip())

  def ready(self):
    self._line('READY')

  def run(self, steps):
    """One untimed step, then `steps` timed ones; their times."""
    self._send(f'run {steps}')
    return json.loads(self._line('TIMES ')[len('TIMES '):])

  def end(self):
    self._send('end')
    self.proc.stdin.close()
    stdout = self._line('RESULT ')
    code = self.proc.wait()
    self.err.seek(0)
    return _result(self.part, self.tree, stdout, code, self.err.read())

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self.err.close()


def run_interleaved(sides, part, args):
  """Both children alive at once, taking turns a round at a time (A B, then B A, ...): one
  untimed step, then `--steps` timed ones each, so a round's pair shares the machine's state of
  those seconds, and what a step leaves behind (freed memory, the kernel's deferred work) falls
  on its own process's next step, as it does in training, not on the other side's clock.
  Returns {side: result}; round r is 'times' [r * steps, (r + 1) * steps) of each side."""
  servers = {}
  try:
    for side, tree, sets, env in sides:
      cmd, full_env = _child_cmd(tree, part, args, sets, env, serve=True)
      servers[side] = Server(cmd, tree, full_env, part)
    for s in servers.values():   # compile and warm up (both at once), then time in turns
      s.ready()
    names = [side for side, *_ in sides]
    for r in range(args.rounds):
      for side in (names if r % 2 == 0 else names[::-1]):
        servers[side].run(args.steps)
    return {side: s.end() for side, s in servers.items()}
  finally:
    for s in servers.values():
      s.kill()


def _note(part, label, side, med, out):
  _log(f'[{part}] {label} {side}: median {med:.3f} s (compile {out["compile_s"]:.1f} s, loss '
       f'{out["loss"]:.4f}; a step: {out["minor_faults"]:.0f} page faults, '
       f'{out["kernel_s"]:.3f} s in the kernel)')


def measure_sequential(sides, part, args):
  """A fresh pair of children each round, one after the other (the order swapped each round).
  Returns ({side: median a round}, {side: page faults a step, by round}, {side: last loss})."""
  runs, faults, loss = {}, {}, {}
  for r in range(args.rounds):
    for side, tree, sets, env in (sides if r % 2 == 0 else sides[::-1]):
      out = run_child(tree, part, args, sets, env)
      med = statistics.median(out['times'])
      _note(part, f'round {r + 1}', side, med, out)
      runs.setdefault(side, []).append(med)
      faults.setdefault(side, []).append(out['minor_faults'])
      loss[side] = out['loss']
  return runs, faults, loss


def measure_interleaved(sides, part, args):
  """One child a side for the whole part, stepping in turns; round r is the median of each
  side's r-th run of `--steps` steps. Same return as `measure_sequential`."""
  outs = run_interleaved(sides, part, args)
  runs, faults, loss = {}, {}, {}
  for side, out in outs.items():
    t = out['times']
    runs[side] = [statistics.median(t[r * args.steps:(r + 1) * args.steps])
                  for r in range(args.rounds)]
    _note(part, f'{args.rounds} rounds', side, statistics.median(runs[side]), out)
    faults[side], loss[side] = [out['minor_faults']], out['loss']
  return runs, faults, loss


def main(argv=None):
  p = argparse.ArgumentParser(prog='mars_jax.bench compare', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--against', default='1cba8b4', help='the earlier commit (any git revision)')
  p.add_argument('--parts', default='var_tiny,var_mid,tok_tiny', help=f'any of {",".join(PARTS)}')
  p.add_argument('--rounds', type=int, default=3,
                 help='rounds, each giving one speed-up (2 or more to judge a target)')
  p.add_argument('--steps', type=int, default=5, help='timed steps a side a round (median)')
  p.add_argument('--sequential', action='store_true',
                 help='a fresh pair of processes each round, run one after the other, instead '
                      'of two processes stepping in turns')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='config override on this checkout\'s side only')
  p.add_argument('--this-env', action='append', default=[], metavar='NAME=VALUE',
                 help='environment variable for this checkout\'s child only (e.g. '
                      'GLIBC_TUNABLES=glibc.malloc.hugetlb=1); both sides otherwise share this '
                      'process\'s environment')
  p.add_argument('--json', action='store_true', help='one JSON document on stdout')
  p.add_argument('--child', help=argparse.SUPPRESS)
  p.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    p.error('--rounds and --steps take 1 or more, --warmup 0 or more')
  bad = [e for e in args.this_env if '=' not in e or not e.split('=', 1)[0]]
  if bad:
    p.error(f'--this-env takes NAME=VALUE, got {", ".join(bad)}')
  this_env = dict(e.split('=', 1) for e in args.this_env)
  if args.child:
    child(args.child, args.steps, args.warmup, args.set, serve=args.serve)
    return 0
  parts = [x for x in args.parts.split(',') if x]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    p.error(f'unknown part(s) {", ".join(unknown)}; choose from {", ".join(PARTS)}')
  from mars_jax.bench import machine as machine_lib
  mach = machine_lib.describe(with_jax=False)
  _log(f'machine: {mach}')
  rows = []
  with tempfile.TemporaryDirectory(prefix='mars_compare_') as tmp:
    old_tree = extract(args.against, os.path.join(tmp))
    new_tree = repo_root()
    for part in parts:
      sides = (('earlier', old_tree, [], {}), ('this', new_tree, args.set, this_env))
      runs, faults, loss = (measure_sequential if args.sequential else measure_interleaved)(
          sides, part, args)
      old, new = statistics.median(runs['earlier']), statistics.median(runs['this'])
      gmean, lo, hi = speedup_interval(runs['earlier'], runs['this'])
      target = TARGETS.get(part)
      judged = (None if target is None else 'one round, not judged' if args.rounds < 2
                else verdict(target, lo, hi))
      rows.append({'part': part, 'earlier_s': old, 'this_s': new, 'speedup': old / new,
                   'round_speedup': gmean, 'round_speedup_lo': lo, 'round_speedup_hi': hi,
                   'earlier_runs': runs['earlier'], 'this_runs': runs['this'],
                   'earlier_loss': loss['earlier'], 'this_loss': loss['this'],
                   'earlier_faults': statistics.median(faults['earlier']),
                   'this_faults': statistics.median(faults['this']),
                   'target': target, 'verdict': judged})
  doc = {'machine': mach, 'against': args.against, 'sets': args.set, 'this_env': this_env,
         'env': {k: os.environ.get(k, '') for k in ('GLIBC_TUNABLES', 'LD_PRELOAD')},
         'end_load': machine_lib.load_average(), 'rows': rows}
  if args.json:
    print(json.dumps(doc, indent=1))
    return 0
  print(f'machine: {mach}; against {args.against}; this side\'s --set: {args.set or "none"}, '
        f'--this-env: {this_env or "none"}; both: {doc["env"]}')
  print('| part | earlier s (median of rounds) | this s | speed-up | per round: mean, +- 2 SE | '
        'target | rounds earlier / this | page faults a step, earlier / this |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    lo, hi = r['round_speedup_lo'], r['round_speedup_hi']
    judged = '-' if r['target'] is None else f'{r["target"]}x: {r["verdict"]}'
    runs = (', '.join(f'{x:.3f}' for x in r['earlier_runs']) + ' / '
            + ', '.join(f'{x:.3f}' for x in r['this_runs']))
    print(f'| {r["part"]} | {r["earlier_s"]:.3f} | {r["this_s"]:.3f} | {r["speedup"]:.2f}x | '
          f'{r["round_speedup"]:.2f}x [{lo:.2f}, {hi:.2f}] | {judged} | {runs} | '
          f'{r["earlier_faults"]:,.0f} / {r["this_faults"]:,.0f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
