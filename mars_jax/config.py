"""Validates a config and derives every shape from it, once, before anything compiles.

All other modules read shapes from `Shapes`, never recompute them, so a change of
sample rate, hop, CMX factor or scale schedule flows through the whole pipeline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

MODES = ('cmx', 'truncate', 'none')
SOURCES = ('synthetic', 'nsynth', 'folder', 'soundfont')


# Fields that change how fast a stage runs or how audio is decoded later, not what it writes:
# left out of every fingerprint, so changing them reuses the work already done (remat only
# trades memory for recomputation: the same loss and gradients; the token cache reads the very
# tokens the step would encode).
NOT_CONTENT = ('data.prepare_workers', 'data.loader_workers', 'spectrogram.griffin_lim_iters',
               'spectrogram.griffin_lim_momentum', 'tokenizer.train.checkpoint_minutes',
               'autoregressor.train.checkpoint_minutes', 'classifier.train.checkpoint_minutes',
               'autoregressor.remat', 'autoregressor.token_cache',
               'tokenizer.train.preemption_check_every',
               'autoregressor.train.preemption_check_every',
               'classifier.train.preemption_check_every', 'tokenizer.train.xla_cpu_options',
               'autoregressor.train.xla_cpu_options', 'classifier.train.xla_cpu_options')


class ConfigError(ValueError):
  """A config field is inconsistent; the message names the field and a fix."""


def xla_options(text: str, field: str) -> dict:
  """'name=value ...' (XLA_FLAGS' syntax, the dashes optional) -> {name: value}, the form
  `jax.stages.Lowered.compile(compiler_options=...)` takes; `field` names the config field in
  the error. Values stay strings, which XLA reads by the option's type: an enum by its full
  name (LIBRARY_FUSION_TYPE_DOT, where XLA_FLAGS would take 'dot')."""
  out = {}
  for item in str(text or '').split():
    name, eq, value = item.lstrip('-').partition('=')
    if not (eq and name.startswith('xla_') and value):
      raise ConfigError(f'{field}={text!r}: {item!r} is not name=value with an XLA option name '
                        f"(e.g. 'xla_backend_optimization_level=1'); '' for none.")
    out[name] = value
  return out


@dataclasses.dataclass(frozen=True)
class Shapes:
  n_samples: int        # waveform length
  freq_bins: int        # spectrogram rows (Nyquist bin dropped)
  frames: int           # spectrogram columns (last frame dropped)
  image: tuple          # tokenizer input (H, W, C) after CMX / truncation
  latent: tuple         # (h, w, d) encoder output = code map size
  scales: tuple         # token map sides, coarse to fine
  num_tokens: int       # sum of side**2 over scales
  num_pitches: int
  pitch_lo: int

  @property
  def spectrogram(self):
    return (self.freq_bins, self.frames)


def _divisors_near(n, target, k=3):
  ds = [d for d in range(1, n + 1) if n % d == 0]
  return sorted(ds, key=lambda d: abs(d - target))[:k]


def derive(config) -> Shapes:
  """Computes all shapes from `config`, raising ConfigError naming the field at fault."""
  s = config.spectrogram
  if config.data.source not in SOURCES:
    raise ConfigError(f'data.source={config.data.source!r}: use one of {SOURCES}.')
  n_exact = s.sample_rate * s.duration
  n = int(round(n_exact))
  if abs(n - n_exact) > 1e-6:
    raise ConfigError(f'spectrogram.duration={s.duration} gives a non-integer number of samples '
                      f'at sample_rate={s.sample_rate}; choose a duration d with sample_rate*d '
                      f'whole.')
  if s.n_fft % 2 or s.n_fft < 4:
    raise ConfigError(f'spectrogram.n_fft={s.n_fft} must be even and >= 4, e.g. 1024.')
  if s.hop <= 0 or n % s.hop:
    raise ConfigError(
        f'spectrogram.hop={s.hop} does not divide the {n} samples of a clip, so the frame count is '
        f'not whole; valid hops near it: {_divisors_near(n, s.hop)}.')
  if s.hop > s.n_fft:
    raise ConfigError(f'spectrogram.hop={s.hop} exceeds n_fft={s.n_fft}; frames would not overlap.')
  freq, frames = s.n_fft // 2, n // s.hop

  r = config.cmx.factor
  mode = config.cmx.mode
  if mode not in MODES:
    raise ConfigError(f'cmx.mode={mode!r}: use one of {MODES}.')
  if mode == 'none':
    image = (freq, frames, 1)
  else:
    if r < 1 or freq % r or frames % r:
      good = [d for d in range(1, 33) if freq % d == 0 and frames % d == 0]
      raise ConfigError(f'cmx.factor={r} must divide the spectrogram ({freq} x {frames}); '
                        f'valid factors: {good}.')
    image = (freq // r, frames // r, r * r if mode == 'cmx' else 1)

  t = config.tokenizer
  mult = tuple(t.channel_mult)
  if not mult:
    raise ConfigError('tokenizer.channel_mult is empty; e.g. (1, 2, 4).')
  down = 2 ** (len(mult) - 1)
  if image[0] % down or image[1] % down:
    raise ConfigError(
        f'tokenizer.channel_mult={mult} halves the {image[0]} x {image[1]} input {len(mult) - 1} '
        f'times, which does not divide it; use fewer entries or another cmx.factor.')
  latent = (image[0] // down, image[1] // down, t.latent_channels)
  for m in mult:
    if (t.channels * m) % t.groups:
      raise ConfigError(f'tokenizer.groups={t.groups} must divide every width '
                        f'tokenizer.channels*channel_mult ({t.channels}*{m}).')
  scales = tuple(int(p) for p in t.scales)
  if latent[0] != latent[1]:
    raise ConfigError(f'the latent map is {latent[0]} x {latent[1]}, but token scales are square; '
                      f'make the spectrogram square (spectrogram.n_fft/2 == samples/hop).')
  if not scales or any(b <= a for a, b in zip(scales, scales[1:])) or scales[0] < 1:
    raise ConfigError(f'tokenizer.scales={scales} must be positive and strictly increasing.')
  if scales[-1] > latent[0]:
    raise ConfigError(f'tokenizer.scales has {scales[-1]}, larger than the {latent[0]} x '
                      f'{latent[1]} latent; the last scale must equal {latent[0]}.')
  if scales[-1] != latent[0]:
    raise ConfigError(f'tokenizer.scales must end at the latent side {latent[0]} '
                      f'(got {scales[-1]}); e.g. append {latent[0]}.')
  if t.lookup not in ('l2', 'cosine'):
    raise ConfigError(f"tokenizer.lookup={t.lookup!r}: use 'l2' or 'cosine'.")
  if not 1 <= t.num_phi <= len(scales):
    raise ConfigError(f'tokenizer.num_phi={t.num_phi} must be in [1, {len(scales)}].')
  level_weight = t.get('level_weight', 0.0)
  if not level_weight >= 0:
    raise ConfigError(f'tokenizer.level_weight={level_weight} must be >= 0 (0 = every bin counts '
                      f'the same; a > 0: an error on the loudest bins counts 1 + a times).')

  lo, hi = (int(v) for v in config.data.pitch_range)
  if not 0 <= lo <= hi <= 127:
    raise ConfigError(f'data.pitch_range={tuple(config.data.pitch_range)} must be (lo, hi) with '
                      f'0 <= lo <= hi <= 127, e.g. (24, 84).')
  if config.data.instrument_label not in ('family', 'instrument'):
    raise ConfigError(f"data.instrument_label={config.data.instrument_label!r}: "
                      f"use 'family' or 'instrument'.")
  if config.data.source == 'soundfont':
    validate_soundfont(config)

  for stage in ('tokenizer', 'autoregressor', 'classifier'):
    tr = config[stage].train
    # Counts first: checkpoint_every / eval_every derive from them (defaults.py).
    for field in ('steps', 'batch_size', 'checkpoints_per_run', 'evals_per_run',
                  'checkpoint_every', 'log_every', 'eval_every', 'preemption_check_every'):
      value = tr.get(field, 1)        # a config.json older than a field keeps working
      if value < 1:
        raise ConfigError(f'{stage}.train.{field}={value} must be >= 1.')
    if not tr.get('checkpoint_minutes', 0) >= 0:   # also False for nan
      raise ConfigError(f'{stage}.train.checkpoint_minutes={tr.checkpoint_minutes} must be >= 0 '
                        f'(0 = by steps only, e.g. 30).')
    if not 0 <= tr.warmup_fraction < 1:
      raise ConfigError(f'{stage}.train.warmup_fraction={tr.warmup_fraction} must be in [0, 1).')
    if not 0 <= tr.warmup_steps < tr.steps:
      raise ConfigError(
          f'{stage}.train.warmup_steps={tr.warmup_steps} must be in [0, steps={tr.steps}): the run '
          f'would end inside its warm-up. Lower it, or leave it unset: it is then '
          f'round(steps * warmup_fraction).')
    if not 0 <= tr.end_lr_fraction <= 1:
      raise ConfigError(f'{stage}.train.end_lr_fraction={tr.end_lr_fraction} must be in [0, 1].')
    if tr.compute_dtype not in ('float32', 'bfloat16'):
      raise ConfigError(f"{stage}.train.compute_dtype={tr.compute_dtype!r}: "
                        f"use 'float32' or 'bfloat16'.")
    xla_options(tr.get('xla_cpu_options', ''), f'{stage}.train.xla_cpu_options')
  a = config.autoregressor
  width = a.width or 64 * a.depth
  heads = a.heads or a.depth
  if width % heads:
    raise ConfigError(f'autoregressor.width={width} must be divisible by '
                      f'autoregressor.heads={heads}.')
  validate_sample(config.sample)
  if not a.drop_path < 1:
    raise ConfigError(f'autoregressor.drop_path={a.drop_path} must be < 1 (-1 = VAR\'s rule, '
                      f'0.1 * depth / 24; 0 = off).')
  if a.gate_init < 0:
    raise ConfigError(f'autoregressor.gate_init={a.gate_init} must be >= 0 (0 = by depth).')
  if a.attention not in ('einsum', 'xla', 'cudnn', 'auto'):
    raise ConfigError(f"autoregressor.attention={a.attention!r}: use 'einsum', 'xla', 'cudnn' or "
                      f"'auto'.")
  if a.token_cache not in ('auto', 'on', 'off'):
    raise ConfigError(f"autoregressor.token_cache={a.token_cache!r}: use 'auto' (encode the "
                      f"train split once when the run reads it at least once), 'on' or 'off' "
                      f"(encode every batch in the step).")
  if a.remat not in ('none', 'dots', 'full'):
    raise ConfigError(f"autoregressor.remat={a.remat!r}: use 'none' (save every activation), "
                      f"'dots' (save the weight-matmul outputs) or 'full' (save block inputs).")

  return Shapes(n_samples=n, freq_bins=freq, frames=frames, image=image, latent=latent,
                scales=scales, num_tokens=sum(p * p for p in scales),
                num_pitches=hi - lo + 1, pitch_lo=lo)


def validate_soundfont(config) -> None:
  """ConfigError naming the data.soundfont.* / data.velocities field that cannot be used."""
  from mars_jax.data.synthetic import NSYNTH_FAMILIES
  s = config.data.soundfont
  fams = tuple(s.families)
  bad = [f for f in fams if f not in NSYNTH_FAMILIES]
  if bad or not fams:
    raise ConfigError(f'data.soundfont.families={fams}: use a non-empty subset of '
                      f'{NSYNTH_FAMILIES}.')
  for field in ('programs_per_family', 'notes_per_pitch'):
    if int(s[field]) < 0:
      raise ConfigError(f'data.soundfont.{field}={s[field]} must be >= 0 (0: all).')
  if not 0.0 < float(s.hold) <= 1.0:
    raise ConfigError(f'data.soundfont.hold={s.hold} must be in (0, 1]: the fraction of '
                      f'spectrogram.duration the key is held (NSynth: 0.75).')
  if not 0.0 < float(s.gain) <= 10.0:
    raise ConfigError(f'data.soundfont.gain={s.gain} must be in (0, 10] (FluidSynth synth.gain).')
  vf, tf = float(s.valid_fraction), float(s.test_fraction)
  if not (vf >= 0.0 and tf >= 0.0 and vf + tf < 1.0):
    raise ConfigError(f'data.soundfont.valid_fraction={vf}, data.soundfont.test_fraction={tf}: '
                      f'each must be >= 0 and their sum < 1.')
  bad = [int(v) for v in config.data.velocities if not 1 <= int(v) <= 127]
  if bad:
    raise ConfigError(f'data.velocities has {bad}; MIDI velocities are 1..127.')


def validate_sample(s) -> None:
  """The sample section: counts whole and in range (the Python API checks its own arguments)."""
  if int(s.num) != s.num or s.num < 0:
    raise ConfigError(f'sample.num={s.num} must be a whole number >= 0 (0 = every pitch x '
                      f'instrument of the grid once).')
  if int(s.batch_size) != s.batch_size or s.batch_size < 1:
    raise ConfigError(f'sample.batch_size={s.batch_size} must be a whole number >= 1, e.g. 16.')
  if not math.isfinite(s.cfg):
    raise ConfigError(f'sample.cfg={s.cfg} must be a finite number (0 = no guidance, e.g. 3.0).')
  if int(s.top_k) != s.top_k or s.top_k < 0:
    raise ConfigError(f'sample.top_k={s.top_k} must be a whole number >= 0 (0 = no top-k filter).')
  if not 0.0 <= s.top_p <= 1.0:
    raise ConfigError(f'sample.top_p={s.top_p} must be in [0, 1] (0 or 1 = no nucleus filter).')
  if int(s.seed) != s.seed or not 0 <= s.seed < 2**31:
    raise ConfigError(f'sample.seed={s.seed} must be a whole number in 0..{2**31 - 1}.')


def mesh_shape(config, num_devices: int) -> dict:
  """Resolves mesh axis sizes (-1 = the rest) against the device count."""
  sizes = {k: int(config.mesh[k]) for k in ('data', 'fsdp', 'tensor')}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {free}.')
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ConfigError(f'mesh sizes must be positive or -1, got {sizes}.')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f'mesh: {sizes} leaves {num_devices}/{fixed} devices for mesh.{free[0]}, '
                        f'not whole; make the fixed axes divide {num_devices}.')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f'mesh.data*mesh.fsdp*mesh.tensor = {math.prod(sizes.values())} but there '
                      f'are {num_devices} devices; set one axis to -1 to take the rest.')
  return sizes


def validate_batch(config, stage: str, num_devices: int, num_processes: int = 1) -> dict:
  """Checks that `stage`'s global batch splits over the data-parallel axes and the processes."""
  sizes = mesh_shape(config, num_devices)
  dp = sizes['data'] * sizes['fsdp']
  b = config[stage].train.batch_size
  if b % dp:
    raise ConfigError(f'{stage}.train.batch_size={b} is not divisible by the data-parallel size '
                      f'mesh.data*mesh.fsdp={dp}; use e.g. {max(dp, b // dp * dp)}.')
  if b % num_processes:
    raise ConfigError(f'{stage}.train.batch_size={b} is not divisible by the {num_processes} '
                      f'processes.')
  return sizes


def fingerprint(config, *sections, exclude=()) -> str:
  """A short hash of the named config sections: a stage's output matches its config iff equal.

  `exclude` lists dotted fields that do not change the output (worker counts, say).
  """
  def plain(v):
    if hasattr(v, 'to_dict'):
      v = v.to_dict()
    if isinstance(v, dict):
      return {k: plain(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return v
  tree = {s: plain(config[s]) for s in sections}
  for dotted in exclude:
    *path, last = dotted.split('.')
    node = tree
    for k in path:
      node = node.get(k, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
      node.pop(last, None)
  blob = json.dumps(tree, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
