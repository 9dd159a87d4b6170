"""The paper's CMX-vs-truncation ablation: the same config and budget, one `cmx.mode` per arm.

MARS reports that lossless CMX costs a little perceptual quality against plain truncation (about
+0.19 FAD) while keeping the whole spectrogram. This runs that comparison at one config
(default configs/small.py):

  * every arm is the whole pipeline (prepare .. evaluate) in ROOT/<mode>, run stage by stage as
    `python -m mars_jax.main ... --config.cmx.mode=<mode>` (each stage timed, its process's peak
    resident memory read with wait4). The prepared data does not depend on cmx.mode: it is
    prepared once, in the first arm, and hard-linked into the others. A stage already complete
    is skipped by main, so rerunning the benchmark resumes where it stopped;
  * every arm's step is also compiled alone at its training batch (bench.tokenizer.Step): the
    compiled tokenizer and autoregressor steps' memory (XLA's memory analysis) and FLOPs;
  * every arm's generated notes (the same requests and seeds in every arm) and its own quality
    ceilings are then scored in ONE feature space: the first arm's (reference) classifiers, on
    the full re-analysed spectrogram. Each arm's own classifiers read its own image (a truncated
    crop for 'truncate'), so its own metrics.json values are not comparable across arms.
    Pitch (librosa.pyin) and the round-trip MSE (the decoded spectrogram, cut-off part filled
    with silence, against the whole true one) are model-independent.

`--modes` may include 'none' (no CMX: the 512 x 512 x 1 spectrogram); its tokenizer then needs
log2(512/16) = 5 down-samplings to reach the same 16 x 16 latent. On a CPU it is not trained:
only its tokenizer step is compiled (memory, FLOPs) and timed, which is what decides whether it
is affordable at all (`--train-none` trains it anyway).

Run:
  python -m mars_jax.bench ablation --root DIR [--config configs/small.py]
      [--modes cmx,truncate,none] [--set tokenizer.train.steps=900 ...] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from mars_jax.bench import machine as machine_lib

STAGES = ('prepare', 'tokenizer', 'autoregressor', 'sample', 'evaluate')


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def load_config(path, mode, sets):
  """The config file with `--set` overrides and cmx.mode applied (ml_collections parsing)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('ablation_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = apply_sets(mod.get_config(), sets)
  config.cmx.mode = mode
  if mode == 'none':
    config.tokenizer.channel_mult = none_channel_mult(config)
  return config


def apply_sets(config, sets):
  """`--set FIELD=VALUE` overrides (a value parsed like the field's current one), in place."""
  for item in sets:
    key, _, value = item.partition('=')
    node = config
    *parents, leaf = key.split('.')
    try:
      for p in parents:
        node = node[p]
      old = node[leaf]
      node[leaf] = _parse_like(value, old)
    except (KeyError, ValueError, SyntaxError) as e:
      raise SystemExit(f'--set {item!r}: no such config field or a value of the wrong type '
                       f'({type(e).__name__}: {e}); fields are listed in mars_jax/defaults.py.')
  return config


def _parse_like(text, old):
  import ast
  if isinstance(old, str):
    return text
  value = ast.literal_eval(text)
  return type(old)(value) if isinstance(old, (bool, int, float)) and not isinstance(
      value, (tuple, list)) else value


def none_channel_mult(config):
  """channel_mult for cmx.mode='none' reaching the cmx arm's latent side: 1s prepended."""
  mult = tuple(config.tokenizer.channel_mult)
  r = int(config.cmx.factor)
  extra = int(round(np.log2(r)))
  if 2 ** extra != r:
    raise SystemExit(f'cmx.factor={r} is not a power of two: the none arm cannot reach the same '
                     f'latent by halvings; leave none out of --modes.')
  return (1,) * extra + mult


def overrides(mode, sets):
  """The main.py flags of one arm."""
  flags = [f'--config.cmx.mode={mode}'] + [f'--config.{s}' for s in sets]
  return flags


def link_tree(src, dst):
  """Hard-links every file of src under dst (copies where links are refused)."""
  import shutil
  for base, _, files in os.walk(src):
    out = os.path.join(dst, os.path.relpath(base, src))
    os.makedirs(out, exist_ok=True)
    for f in files:
      try:
        os.link(os.path.join(base, f), os.path.join(out, f))
      except OSError:
        shutil.copy2(os.path.join(base, f), os.path.join(out, f))


def run_stage(config_path, workdir, stage, flags, log=_log):
  """One stage in a child process: (seconds, peak resident bytes). Exits on failure."""
  cmd = [sys.executable, '-m', 'mars_jax.main', f'--config={config_path}',
         f'--workdir={workdir}', f'--stages={stage}', *flags]
  log(f'[ablation] {" ".join(cmd)}')
  t0 = time.time()
  proc = subprocess.Popen(cmd)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.time() - t0
  if proc.returncode:
    raise SystemExit(f'[ablation] {stage} failed in {workdir} (exit {proc.returncode}; its '
                     f'output is above). Rerun the same command to resume from there.')
  return seconds, usage.ru_maxrss * 1024   # Linux reports KiB


def run_arm(config_path, root, mode, sets, first_data, log=_log):
  """The pipeline of one arm; returns {stage: {'seconds', 'peak_rss_bytes'}} (stages that were
  already complete keep the numbers recorded when they ran)."""
  workdir = os.path.join(root, mode)
  record = os.path.join(workdir, 'ablation_stages.json')
  if first_data and not os.path.exists(os.path.join(workdir, 'data')):
    log(f'[ablation] {mode}: hard-linking the prepared data of {first_data}')
    link_tree(first_data, os.path.join(workdir, 'data'))
  times = json.load(open(record)) if os.path.exists(record) else {}
  for stage in STAGES:
    seconds, rss = run_stage(config_path, workdir, stage, overrides(mode, sets), log)
    if stage not in times or seconds > 0.5 * times[stage]['seconds']:  # a skip takes seconds
      times[stage] = {'seconds': seconds, 'peak_rss_bytes': rss}
    with open(record, 'w') as f:
      json.dump(times, f, indent=1)
  return times


def step_costs(config, log=_log):
  """Compiled train steps at the config's batches: {stage: {xla_bytes, gflop, compile_s}}."""
  from mars_jax.bench import gpu
  from mars_jax.bench import tokenizer as tok_bench
  out = {}
  for stage, make in (('tokenizer', tok_bench.tokenizer_task),
                      ('autoregressor', gpu.var_task)):
    batch = int(config[stage].train.batch_size)
    step = tok_bench.Step(config, batch, stage=stage, make=make)
    mem = step.memory()
    flops = tok_bench.flops_of(step.compiled)
    if stage == 'autoregressor':
      flops = gpu.var_model_flops(config, step.shapes, batch)
    out[stage] = {'batch': batch, 'xla_bytes': mem.get('total_minus_alias_bytes'),
                  'gflop': flops / 1e9 if flops else None, 'compile_s': step.compile_s}
    log(f'[ablation] {config.cmx.mode} {stage} step: {out[stage]}')
    del step
  return out


def time_none(config, steps, log=_log):
  """The none arm's tokenizer step only: memory, FLOPs and the median of `steps` timed steps."""
  from mars_jax.bench import tokenizer as tok_bench
  batch = int(config.tokenizer.train.batch_size)
  step = tok_bench.Step(config, batch)
  mem = step.memory()
  flops = tok_bench.flops_of(step.compiled)
  times = step.time_steps(warmup=1, steps=steps)
  return {'tokenizer': {'batch': batch, 'xla_bytes': mem.get('total_minus_alias_bytes'),
                        'gflop': flops / 1e9 if flops else None, 'compile_s': step.compile_s,
                        'step_s': statistics.median(times),
                        'channel_mult': list(config.tokenizer.channel_mult),
                        'image': list(step.shapes.image)}}


def train_step_seconds(workdir, stage):
  """Median seconds per training step, from the engine's logged steps_per_sec."""
  path = os.path.join(workdir, stage, 'metrics.jsonl')
  rates = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row.get('steps_per_sec'):
        rates.append(float(row['steps_per_sec']))
  return 1.0 / statistics.median(rates) if rates else None


def score_arms(ref_config, root, modes, log=_log):
  """Every arm's generated notes in the reference arm's feature space, plus its own ceilings."""
  from mars_jax import config as config_lib
  from mars_jax import workdir as workdir_lib
  from mars_jax.audio import spectrogram as spec_lib
  from mars_jax.evaluate import ceilings
  from mars_jax.evaluate import metrics as M
  from mars_jax.stages import evaluate as ev
  from mars_jax.train import partitioning

  ref_wd = os.path.join(root, modes[0])
  shapes = config_lib.derive(ref_config)
  sr = int(ref_config.spectrogram.sample_rate)
  feat = ev.Featuriser(ref_config, ref_wd, partitioning.make_mesh(ref_config))
  train = ev.real_features(feat, ev.RealSplit(ref_config, ref_wd, 'train'))
  vocab = workdir_lib.load_manifest(ref_wd)['vocab']
  rows = {}
  for mode in modes:
    wd = os.path.join(root, mode)
    entries, pitch, inst = ev.load_samples(ref_config, wd, vocab)
    waves, _ = ev.load_waves(ref_config, wd, entries)
    x = feat(spec_lib.spectrogram(waves, ref_config.spectrogram))
    x.update(pitch=pitch, instrument=inst)
    row = ev.set_metrics(ref_config, x, train, '', shapes.pitch_lo)
    row.update(ceilings.pitch_scores(waves, sr, pitch, ''))
    n = len(waves)
    row['n'] = n
    for k in ('pitch_within_semitone', 'pitch_exact'):
      row[k + '_se'] = M.standard_error(row[k], n)
    own = json.load(open(os.path.join(wd, 'eval', 'metrics.json')))
    for k in ('recon_mse', 'recon_pitch_within_semitone', 'recon_pitch_within_semitone_se',
              'recon_pitch_within_semitone_n', 'real_fad_clf_pitch', 'real_fad_clf_instrument',
              'real_pkid', 'real_ikid', 'gl_pitch_within_semitone'):
      row[k] = own.get(k)
    rows[mode] = row
    log(f'[ablation] {mode}: pitch within a semitone {row["pitch_within_semitone"]:.3f} +- '
        f'{row["pitch_within_semitone_se"]:.3f}, fad_clf_pitch {row.get("fad_clf_pitch")}')
  # The reference arm's real ceilings, in the shared feature space.
  rows['real'] = {k[len('real_'):]: v for k, v in rows[modes[0]].items()
                  if k.startswith('real_') and v is not None}
  return rows


def _f(v, spec='.3f'):
  return 'n/a' if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def table(result) -> str:
  lines = ['| arm | image | tok step s | tok step MiB | AR step s | AR step MiB | stage minutes '
           '(prep/tok/AR/sample/eval) | round-trip MSE | round trip within 1 | generated within 1 '
           '(se) | fad_clf pitch | fad_clf instr | PKID | IKID |',
           '|' + '---|' * 14]
  for mode, arm in result['arms'].items():
    s, cost = arm.get('scores', {}), arm.get('steps', {})
    tok, ar = cost.get('tokenizer', {}), cost.get('autoregressor', {})
    st = arm.get('stages', {})
    minutes = '/'.join(_f(st[k]['seconds'] / 60, '.1f') if k in st else '-' for k in STAGES)
    mib = (lambda b: _f(b / 2**20, '.0f') if b else 'n/a')
    lines.append(
        f'| {mode} | {"x".join(map(str, arm.get("image", [])))} | '
        f'{_f(arm.get("tokenizer_step_s"))} | {mib(tok.get("xla_bytes"))} | '
        f'{_f(arm.get("autoregressor_step_s"))} | {mib(ar.get("xla_bytes"))} | {minutes} | '
        f'{_f(s.get("recon_mse"), ".4f")} | {_f(s.get("recon_pitch_within_semitone"))} | '
        f'{_f(s.get("pitch_within_semitone"))} ({_f(s.get("pitch_within_semitone_se"))}) | '
        f'{_f(s.get("fad_clf_pitch"))} | {_f(s.get("fad_clf_instrument"))} | '
        f'{_f(s.get("pkid"), ".4f")} | {_f(s.get("ikid"), ".4f")} |')
  real = result.get('real')
  if real:
    lines.append(f'| real test notes (ceiling) | | | | | | | | | | '
                 f'{_f(real.get("fad_clf_pitch"))} | {_f(real.get("fad_clf_instrument"))} | '
                 f'{_f(real.get("pkid"), ".4f")} | {_f(real.get("ikid"), ".4f")} |')
  return '\n'.join(lines)


def main(argv):
  p = argparse.ArgumentParser(prog='python -m mars_jax.bench ablation', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', required=True, help='one workdir per arm is made under it')
  p.add_argument('--config', default='configs/small.py')
  p.add_argument('--modes', default='cmx,truncate,none',
                 help="comma-separated cmx.mode values; the first is the reference")
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='a config override for every arm, e.g. tokenizer.train.steps=900')
  p.add_argument('--train-none', action='store_true',
                 help="train the 'none' arm too (days on a CPU at 512 x 512)")
  p.add_argument('--none-steps', type=int, default=2, help="timed steps of the 'none' step")
  p.add_argument('--json', action='store_true', help='one JSON document instead of the table')
  args = p.parse_args(argv)
  modes = [m for m in args.modes.split(',') if m]
  if not modes or modes[0] == 'none':
    raise SystemExit("--modes must start with a trained arm ('cmx' or 'truncate').")
  from mars_jax import config as config_lib
  t0 = time.time()
  result = {'machine': machine_lib.describe(), 'config': args.config, 'sets': args.set,
            'arms': {}}
  trained_modes = [m for m in modes if m != 'none' or args.train_none]
  first_data = None
  for mode in modes:
    config = load_config(args.config, mode, args.set)
    shapes = config_lib.derive(config)
    arm = {'image': list(shapes.image), 'latent': list(shapes.latent),
           'channel_mult': list(config.tokenizer.channel_mult)}
    if mode in trained_modes:
      flags_sets = args.set + ([f'tokenizer.channel_mult={tuple(config.tokenizer.channel_mult)}']
                               if mode == 'none' else [])
      arm['stages'] = run_arm(args.config, args.root, mode, flags_sets, first_data)
      first_data = first_data or os.path.join(args.root, mode, 'data')
      wd = os.path.join(args.root, mode)
      arm['tokenizer_step_s'] = train_step_seconds(wd, 'tokenizer')
      arm['autoregressor_step_s'] = train_step_seconds(wd, 'autoregressor')
      arm['steps'] = step_costs(config)
    else:
      try:
        arm['steps'] = time_none(config, args.none_steps)
        arm['tokenizer_step_s'] = arm['steps']['tokenizer']['step_s']
      except Exception as e:   # out of memory is an answer here, not a crash
        arm['error'] = f'{type(e).__name__}: {str(e)[:300]}'
        _log(f'[ablation] none: {arm["error"]}')
    result['arms'][mode] = arm
  ref = load_config(args.config, modes[0], args.set)
  scores = score_arms(ref, args.root, trained_modes)
  result['real'] = scores.pop('real')
  for mode, row in scores.items():
    result['arms'][mode]['scores'] = row
  result['seconds'] = time.time() - t0
  if args.json:
    print(json.dumps(result, default=float))
  else:
    print(f'machine: {result["machine"]}; config {args.config} {" ".join(args.set)}; '
          f'{result["seconds"] / 60:.0f} min')
    print(table(result))
  with open(os.path.join(args.root, 'ablation.json'), 'w') as f:
    json.dump(result, f, default=float, indent=1)
  return 0
