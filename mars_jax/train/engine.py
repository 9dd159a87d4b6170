"""ONE training loop for every model: the model stages describe a `Task`, the engine does the rest.

The engine owns the mesh, sharded init, the optimizer, the jitted step, checkpoints (state +
data-iterator position), preemption, NaN detection, evaluation and logging; it never knows which
model it trains.

Mixed precision: parameters (and optimizer state, EMA) are always kept in float32 ("master
weights"). With `<stage>.train.compute_dtype='bfloat16'` the step casts every float32 parameter to
bfloat16 *inside* the differentiated function, so the forward/backward run in bf16 (and FSDP
all-gathers move bf16), while the gradient arrives back in float32 through the cast and the
update is applied to the float32 copy. A Task that wants finer control (e.g. keep a VQ codebook
in fp32) sets `cast_params=False` and reads `compute_dtype` from the config itself (Flax
`dtype=bf16, param_dtype=fp32`). The loss is always reduced in float32.

Failure surfaces (for the CLI):
  * SIGTERM -> the loop saves at the current step, waits for the write and raises `Preempted`
    (the CLI should exit 143 = 128+SIGTERM so a scheduler requeues; a rerun resumes).
  * `<stage>.train.checkpoint_minutes` > 0 also saves whenever that much wall time passed since
    the last save: a preemption that sends no SIGTERM (a TPU maintenance event, a killed node)
    loses at most that much, however long `checkpoint_every` steps take.
  * non-finite loss / grad norm at step j -> `NonFiniteLoss` naming j and the last good
    checkpoint; the bad update is not applied and nothing is saved after it.
  * bad mesh/batch config -> `mars_jax.config.ConfigError` before anything compiles.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
import zlib
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mars_jax import progress
from mars_jax.config import ConfigError, validate_batch, xla_options
from mars_jax.train import checkpoint as ckpt
from mars_jax.train import metrics_log as tlog
from mars_jax.train.partitioning import (abstract_batch, logical_rules, make_mesh, put_batch,
                                         replicated, shardings_of, unbox)


class Loss(NamedTuple):
  """What Task.loss returns: the scalar to minimise, {name: scalar} to log, and `aux` (any
  pytree, e.g. VQ code counts) handed to Task.after_step."""
  value: Any
  metrics: dict
  aux: Any = None


@dataclasses.dataclass(frozen=True)
class Task:
  """What a model stage hands the engine. Every callable is pure JAX and is traced under jit.

  init(rng, batch) -> params; leaves may be nn.Partitioned logical boxes (they set shardings).
  loss(params, batch, rng, step, frozen) -> Loss(value, metrics, aux).
  eval_fn(params, batch, frozen) -> {name: scalar}: jitted; averaged over the held-out batches.
  init_extra(rng, params) -> extra_state: non-gradient state (may hold boxes), e.g. VQ usage counts.
  after_step(params, extra_state, aux, rng) -> (params, extra_state): a non-gradient update run
    inside the jitted step after the optimizer (e.g. re-seeding dead codes).
  on_eval(params, step, stage_dir): python callback at every eval (images, audio); runs on every
    process with the global (sharded) params, so it may gather; write files from process 0 only.
    It may return {name: float}, logged with the eval's metrics (e.g. a pyin pitch score).
  decay_mask(params) -> bool tree: weight decay where True (default: `decay_mask`, by name).
  trainable(params) -> bool tree: False leaves are frozen (zero update; default all trainable).
  cast_params: with compute_dtype='bfloat16', cast float32 params to bf16 inside the step.
  frozen: a pytree of (sharded) arrays another stage trained, e.g. the tokenizer under the
    autoregressor, passed to loss and eval_fn as their last argument ({} when None). It is a jit
    argument, never a baked-in constant, and is neither differentiated nor checkpointed.
  """
  init: Callable[..., Any]
  loss: Callable[..., Any]
  init_extra: Optional[Callable[..., Any]] = None
  after_step: Optional[Callable[..., Any]] = None
  eval_fn: Optional[Callable[..., Any]] = None
  on_eval: Optional[Callable[..., Any]] = None
  decay_mask: Optional[Callable[..., Any]] = None
  trainable: Optional[Callable[..., Any]] = None
  cast_params: bool = True
  frozen: Any = None


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # () int32: updates applied so far
  params: Any                # float32 master weights
  opt_state: Any
  ema_params: Any            # same tree as params, or None (ema_decay == 0)
  extra_state: Any           # Task.init_extra(...) or None
  rng: jax.Array             # (2,) uint32 base key; step keys are fold_in(rng, step)


class Preempted(Exception):
  """SIGTERM arrived; the state at `step` was saved to `path`. Rerun to resume."""

  def __init__(self, stage, step, path):
    super().__init__(f'{stage}: preempted (SIGTERM); saved step {step} to {path}; '
                     f'rerun the same command to resume.')
    self.stage, self.step, self.path = stage, step, path


class NonFiniteLoss(FloatingPointError):
  """The loss (or gradient norm) became NaN/Inf; nothing after the last good checkpoint is kept."""

  def __init__(self, stage, step, value, last_step, path):
    where = (f'last good checkpoint: step {last_step} in {path}' if last_step is not None
             else f'no checkpoint was saved yet ({path})')
    super().__init__(
        f'{stage}: non-finite loss/grad ({value}) at step {step}; training stopped without '
        f'saving. {where}. Lower {stage}.train.lr or raise warmup_steps/clip_norm, then rerun '
        f'(it resumes from that checkpoint).')
    self.stage, self.step, self.last_step, self.path = stage, step, last_step, path


# --- optimizer ---------------------------------------------------------------------------------


# Weight decay goes to weight matrices and convolution kernels only, chosen by the parameter's
# NAME (the last key of its path), never by its rank: under nn.scan every block bias is 2-D. This
# follows the reference VAR (utils/lr_control.py filter_params with train.py's nowd_keys): no
# decay on biases, 1-D tensors, the attention's learned scale (VAR scale_mul, ours log_scale) or
# the start / position / level embeddings (VAR pos_start, pos_1LC, lvl_embed); VAR does decay its
# class embedding, whose counterparts here are the pitch and instrument tables. Not decayed
# either: GroupNorm scales and biases and the VQ codebook (decay would pull the codes towards 0
# against the commitment loss; VAR never trains its VQ-VAE). tests/test_schedule.py lists every
# parameter this selects in the tiny tokenizer and VAR.
DECAYED_PARAM_NAMES = frozenset({
    'kernel',                     # every nn.Dense / nn.Conv weight (all models)
    'qkv', 'proj',                # VAR attention's explicit q/k/v and output projections
    'pitch_embed', 'inst_embed',  # VAR's class_emb (condition tables)
})


def _leaf_name(path):
  last = path[-1] if path else None
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def decay_mask(params):
  """True where weight decay applies: leaves named in DECAYED_PARAM_NAMES."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_PARAM_NAMES,
                                          params)


def schedule_points(tc) -> dict:
  """The numbers of `<stage>.train`'s learning-rate schedule, as make_optimizer builds it.

  Linear warm-up from 0 at step 0 to the peak `lr` at step `warmup`, then a cosine to
  `lr * end_lr_fraction`, reached exactly at the last step (`steps - 1`), so the last update uses
  the end value. Step i is the i-th update (metrics.jsonl's `lr` at step n is the schedule at n-1).
  """
  steps = int(tc.steps)
  warmup = max(0, min(int(tc.warmup_steps), steps - 1))   # config.derive rejects warmup >= steps
  return dict(steps=steps, warmup=warmup, peak=float(tc.lr),
              end=float(tc.lr) * float(tc.end_lr_fraction),
              decay_steps=max(steps - 1, warmup + 1))     # optax: steps to the end value


def make_optimizer(tc, task: Task):
  """AdamW (decoupled decay on matrices) with linear warmup + cosine decay, global-norm clipping."""
  pts = schedule_points(tc)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=pts['peak'], warmup_steps=pts['warmup'],
      decay_steps=pts['decay_steps'], end_value=pts['end'])
  parts = []
  if tc.clip_norm and tc.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(tc.clip_norm))
  parts.append(optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                           mask=task.decay_mask or decay_mask))
  tx = optax.chain(*parts)
  if task.trainable is not None:
    labels = lambda p: jax.tree.map(lambda t: 'train' if t else 'frozen', task.trainable(p))
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def describe_schedule(stage, tc, params=None, mask_fn=None) -> str:
  """One line: the schedule and, given (abstract) params, what weight decay applies to."""
  pts = schedule_points(tc)
  line = (f'{stage}: lr schedule: {pts["steps"]} steps, warm-up {pts["warmup"]} steps '
          f'0 -> {pts["peak"]:g}, cosine to {pts["end"]:g} at the last step; '
          f'AdamW b1={tc.b1:g} b2={tc.b2:g}, clip {tc.clip_norm:g}, '
          f'weight decay {tc.weight_decay:g}')
  if params is not None:
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves((mask_fn or decay_mask)(params))
    n = sum(int(np.prod(x.shape)) for x in leaves)
    nd = sum(int(np.prod(x.shape)) for x, f in zip(leaves, flags) if f)
    line += (f' on {sum(map(bool, flags))} of {len(leaves)} tensors '
             f'({nd / max(n, 1):.1%} of {n:,} params)')
  return line


# --- state construction ------------------------------------------------------------------------


def base_rng(config, stage):
  """Per-stage key: the same seed gives different streams to different stages."""
  salt = zlib.crc32(stage.encode()) & 0x7FFFFFFF
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), salt)


def _cast_fn(dtype):
  if dtype == jnp.float32:
    return lambda tree: tree
  return lambda tree: jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, tree)


def _boxed_init(task, rng, batch):
  """params (and extra state) possibly holding logical boxes; keys split the same way always."""
  init_rng, extra_rng = jax.random.split(jax.random.fold_in(rng, 0x1A17))
  params = task.init(init_rng, batch)
  extra = None
  if task.init_extra is not None:
    extra = task.init_extra(extra_rng, unbox(params))
  return params, extra


def _like_params(tree, params, p_shard, default):
  """Shardings for an optimizer state: a leaf whose key path ends with a param's path and has its
  shape (mu, nu, ... inside any chain / masked / multi_transform state) shards like that param;
  everything else (counters, scalars) gets `default`. (optax.tree_map_params trips on masks.)"""
  table = {}
  for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                           jax.tree.leaves(p_shard)):
    table[tuple(path)] = (tuple(x.shape), sh)

  def one(path, leaf):
    path = tuple(path)
    for i in range(len(path)):
      hit = table.get(path[i:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return default
  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(task, tx, tc, mesh, rules, rng, batch_abs):
  """(abstract TrainState, TrainState of NamedShardings), traced without allocating anything."""
  boxed_params, boxed_extra = jax.eval_shape(lambda r, b: _boxed_init(task, r, b), rng, batch_abs)
  p_shard = shardings_of(boxed_params, mesh, rules)
  params = unbox(boxed_params)
  e_shard = None if boxed_extra is None else shardings_of(boxed_extra, mesh, rules)
  extra = None if boxed_extra is None else unbox(boxed_extra)
  opt = jax.eval_shape(tx.init, params)
  rep = replicated(mesh)
  o_shard = _like_params(opt, params, p_shard, rep)
  ema = tc.ema_decay > 0
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
                        ema_params=params if ema else None, extra_state=extra,
                        rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype))
  shard = TrainState(step=rep, params=p_shard, opt_state=o_shard,
                     ema_params=p_shard if ema else None, extra_state=e_shard, rng=rep)
  return abstract, shard


def abstract_params(task, config, mesh, local_batch):
  """ShapeDtypeStructs (with shardings on `mesh`) of task's params: the target of restore_params.

  mars_jax.trained.restore reads a trained model back this way.
  """
  rules = logical_rules(config)
  batch_abs = abstract_batch(local_batch, mesh)
  rng = jax.random.PRNGKey(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed, _ = jax.eval_shape(lambda r, b: _boxed_init(task, r, b), rng, batch_abs)
    shard = shardings_of(boxed, mesh, rules)
  return ckpt.abstract_with_shardings(unbox(boxed), shard)


def _init_state(task, tx, tc, rng):
  def init(batch):
    boxed, extra = _boxed_init(task, rng, batch)
    params = unbox(boxed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if tc.ema_decay > 0 else None,
                      extra_state=None if extra is None else unbox(extra), rng=rng)
  return init


def _param_cast(task, tc):
  """The cast applied to params inside the step (bf16 compute, float32 master weights)."""
  if not task.cast_params:
    return lambda tree: tree
  return _cast_fn(jnp.bfloat16 if tc.compute_dtype == 'bfloat16' else jnp.float32)


def _step_fn(task, tx, schedule, tc):
  cast = _param_cast(task, tc)
  decay = float(tc.ema_decay)

  def step(state: TrainState, batch, frozen):
    key = jax.random.fold_in(state.rng, state.step)
    loss_rng, after_rng = jax.random.split(key)

    def loss_fn(params):
      out = task.loss(cast(params), batch, loss_rng, state.step, frozen)
      if not isinstance(out, Loss):
        raise TypeError(f'Task.loss must return engine.Loss(value, metrics, aux), not '
                        f'{type(out).__name__}.')
      return jnp.asarray(out.value, jnp.float32), (out.metrics, out.aux)

    (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extra = state.extra_state
    if task.after_step is not None:
      params, extra = task.after_step(params, extra, aux, after_rng)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                        extra_state=extra)
    # A non-finite step is not applied: the state in memory (and any later save) stays good.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    out = {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}
    out.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step))
    return new, out

  return step


# XLA options for a program that runs once (the init): LLVM's effort only, the HLO is the same.
ONCE_OPTIONS = {'xla_backend_optimization_level': 0}


class TrainStep:
  """A task's train step, jitted for a mesh and a batch shape exactly as `train` runs it; the
  benchmarks compile and time this same object (as MaxText's AOT tool uses its jit_train_step).

  Build it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(logical_rules(config))`.
  `abstract` / `shardings` are the TrainState's shapes and shardings, `target` both together (a
  restore target); `init(global batch)` creates a sharded TrainState; `compile()` lowers and
  compiles the step once; then `step(state, global batch) -> (state, metrics)`.
  """

  def __init__(self, task: Task, config, stage: str, mesh, batch_abs):
    self.task, self.mesh, self.batch_abs, self.stage = task, mesh, batch_abs, stage
    self.tc = config[stage].train
    self.tx, self.schedule = make_optimizer(self.tc, task)
    self.rng = base_rng(config, stage)
    self.abstract, self.shardings = state_shardings(task, self.tx, self.tc, mesh,
                                                    logical_rules(config), self.rng, batch_abs)
    self.target = ckpt.abstract_with_shardings(self.abstract, self.shardings)
    self.frozen = {} if task.frozen is None else task.frozen
    self.compiled = None

  @property
  def on_cpu(self) -> bool:
    """Whether the mesh is CPU devices (where the CPU-only XLA options apply)."""
    return self.mesh.devices.flat[0].platform == 'cpu'

  def init(self, batch) -> TrainState:
    """A fresh sharded TrainState. It runs once, so on a CPU its program is compiled without
    LLVM's optimisations (ONCE_OPTIONS): the tiny tokenizer's init compiles in 5-6 s instead of
    13-17 s and runs in 0.08 s instead of 0.03 s (one device, 2-core CPU)."""
    init = jax.jit(_init_state(self.task, self.tx, self.tc, self.rng),
                   out_shardings=self.shardings)
    return init.lower(batch).compile(ONCE_OPTIONS if self.on_cpu else None)(batch)

  def compile(self, compiler_options=None):
    """The compiled step (XLA's memory and cost analyses hang off it). On a CPU it compiles with
    `<stage>.train.xla_cpu_options`. `compiler_options`: XLA options for this compile only, added
    to those, e.g. {'xla_backend_optimization_level': 0} where only the memory analysis is
    wanted (the same buffers, half the CPU compile time)."""
    if self.on_cpu:
      compiler_options = {**xla_options(self.tc.get('xla_cpu_options', ''),
                                        f'{self.stage}.train.xla_cpu_options'),
                          **(compiler_options or {})}
    batch_shard = {k: v.sharding for k, v in self.batch_abs.items()}
    frozen_shard = jax.tree.map(lambda a: a.sharding, self.frozen)
    jitted = jax.jit(_step_fn(self.task, self.tx, self.schedule, self.tc),
                     in_shardings=(self.shardings, batch_shard, frozen_shard),
                     out_shardings=(self.shardings, replicated(self.mesh)), donate_argnums=0)
    self.compiled = jitted.lower(self.target, self.batch_abs, self.frozen).compile(
        compiler_options)
    return self.compiled

  def step(self, state, batch):
    return self.compiled(state, batch, self.frozen)

  def eval_step(self):
    """Task.eval_fn jitted, (params, global batch) -> {name: mean}; None without an eval_fn."""
    if self.task.eval_fn is None:
      return None
    cast = _param_cast(self.task, self.tc)
    eval_fn = self.task.eval_fn
    jitted = jax.jit(lambda p, b, f: {k: jnp.mean(jnp.asarray(v, jnp.float32))
                                      for k, v in eval_fn(cast(p), b, f).items()},
                     out_shardings=replicated(self.mesh))
    return lambda params, batch: jitted(params, batch, self.frozen)


# --- preemption --------------------------------------------------------------------------------


class PreemptionPoll:
  """SIGTERM only sets a flag; the loop saves at a step boundary (signal-safe, no torn state).

  With several processes every one must save the same step, so the flag (and process 0's clock
  for timed saves) is agreed in one tiny all-gather; that gather blocks dispatch, so it runs
  only at steps that are multiples of `every` (the same steps on every process), not each step.
  A SIGTERM then waits at most `every` steps: keep every x step time well under the platform's
  grace period (30 s on Cloud TPU Spot). One process needs no agreement and looks every step.
  """

  def __init__(self, every: int = 1):
    self.flag = False
    self.every = max(int(every), 1)
    self._prev = None
    self._installed = False

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    else:
      logging.warning('engine: not the main thread; SIGTERM will not trigger a preemption save.')
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)

  def agree(self, step: int, time_due: bool) -> tuple[bool, bool]:
    """(any process got SIGTERM, process 0's clock says a timed save is due), the same on every
    process. Process 0 alone decides the time, since the hosts' clocks and compile times
    differ. Between agreement steps both are False on every process."""
    if jax.process_count() == 1:
      return self.flag, time_due
    if step % self.every:
      return False, False
    from jax.experimental import multihost_utils
    got = np.asarray(multihost_utils.process_allgather(np.int32([self.flag, time_due])))
    return bool(np.any(got[:, 0])), bool(got[0, 1])


# --- the loop ----------------------------------------------------------------------------------


def _check_local_batch(local, config, stage):
  want = config[stage].train.batch_size // jax.process_count()
  for k, v in local.items():
    n = np.shape(v)[0] if np.ndim(v) else None
    if np.asarray(v).dtype.kind in 'biufc' and n != want:
      raise ConfigError(
          f'{stage}.train.batch_size={config[stage].train.batch_size} over '
          f'{jax.process_count()} process(es) needs {want} rows per process, but the data '
          f'pipeline gave batch[{k!r}] with shape {np.shape(v)}.')


_MEMORY_KEYS = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                'alias_size_in_bytes', 'generated_code_size_in_bytes', 'peak_memory_in_bytes')


def step_memory(compiled) -> dict:
  """Per-device bytes of a compiled step, from XLA's memory analysis ({} where the backend has
  none): its fields, plus total_bytes = arguments (train state, batch) + temporaries (the
  activations saved for the backward pass, XLA scratch) + outputs, and total_minus_alias_bytes
  = that less the donated state the outputs reuse: about what one device must hold at once."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    mem = None
  if mem is None:
    return {}
  out = {k: int(getattr(mem, k, 0) or 0) for k in _MEMORY_KEYS}
  out['total_bytes'] = (out['temp_size_in_bytes'] + out['argument_size_in_bytes']
                        + out['output_size_in_bytes'])
  out['total_minus_alias_bytes'] = out['total_bytes'] - out['alias_size_in_bytes']
  return out


def device_memory_limit(device=None) -> Optional[int]:
  """Bytes one device can allocate (memory_stats()['bytes_limit']); None where unknown (CPU)."""
  try:
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
  except Exception:
    return None
  value = stats.get('bytes_limit')
  return int(value) if value else None


def memory_warning(stage, mem: dict, limit: Optional[int]) -> Optional[str]:
  """A warning when the step's estimate (step_memory) exceeds the device limit, else None."""
  need = mem.get('total_minus_alias_bytes')
  if not need or not limit or need <= limit:
    return None
  return (f'{stage}: the compiled step needs ~{need / 2**30:.1f} GiB per device (train state '
          f'{mem["argument_size_in_bytes"] / 2**30:.1f} GiB + temporaries '
          f'{mem["temp_size_in_bytes"] / 2**30:.1f} GiB, mostly saved activations) but the '
          f'device holds {limit / 2**30:.1f} GiB: lower {stage}.train.batch_size per device, or '
          f"for the VAR set autoregressor.remat='dots' or 'full'.")


def _log_memory(stage, compiled, seconds):
  mem = step_memory(compiled)
  if not mem:
    progress.say(f'{stage}: step compiled in {seconds:.1f}s (no memory analysis on this backend)')
    return
  mib = lambda k: mem[k] / 2**20
  progress.say(f'{stage}: step compiled in {seconds:.1f}s; per device: '
               f'args {mib("argument_size_in_bytes"):.1f} MiB, '
               f'outputs {mib("output_size_in_bytes"):.1f} MiB, '
               f'temps {mib("temp_size_in_bytes"):.1f} MiB, '
               f'aliased {mib("alias_size_in_bytes"):.1f} MiB, '
               f'code {mib("generated_code_size_in_bytes"):.1f} MiB')
  warning = memory_warning(stage, mem, device_memory_limit())
  if warning:
    progress.say('WARNING: ' + warning)
    logging.warning(warning)


def train(task: Task, config, stage: str, stage_dir: str, train_iter_fn: Callable[[], Any],
          eval_iter_fn: Optional[Callable[[], Any]] = None, *, devices=None) -> TrainState:
  """Trains `task` for config[stage].train.steps, resuming from stage_dir/checkpoints if present.

  train_iter_fn() -> an endless iterator of per-process numpy dict batches with get_state() /
    set_state() (a grain DatasetIterator); its position is checkpointed with the state.
  eval_iter_fn() -> a fresh finite iterable of per-process batches (held-out data), or None.
  devices: the mesh's devices (default all); tests pass a subset.
  Returns the final TrainState (global, sharded arrays). Raises Preempted / NonFiniteLoss /
  ConfigError as described in the module docstring.
  """
  tc = config[stage].train
  devices = list(jax.devices() if devices is None else devices)
  validate_batch(config, stage, len(devices), jax.process_count())   # before any compile
  mesh = make_mesh(config, devices)
  rules = logical_rules(config)
  directory = ckpt.ckpt_dir(stage_dir)

  it = train_iter_fn()
  if not hasattr(it, 'get_state'):   # a grain IterDataset: take its (checkpointable) iterator
    it = iter(it)
  pos = it.get_state()
  sample = next(it)                  # shapes only; the iterator is rewound below
  it.set_state(pos)
  _check_local_batch(sample, config, stage)
  batch_abs = abstract_batch(sample, mesh)

  mngr = ckpt.manager(directory, keep=tc.keep_checkpoints)
  logger = None
  try:
    poll = PreemptionPoll(tc.get('preemption_check_every', 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), poll as sigterm:
      train_step = TrainStep(task, config, stage, mesh, batch_abs)
      progress.say(describe_schedule(stage, tc, train_step.abstract.params, task.decay_mask))
      latest = mngr.latest_step()
      if latest is not None:
        progress.say(f'{stage}: resuming from step {latest} ({directory})')
        state = ckpt.restore(mngr, latest, train_step.target, it)
      else:
        state = train_step.init(put_batch(sample, mesh))        # created already sharded
      start = int(jax.device_get(state.step))
      if start >= tc.steps:
        progress.say(f'{stage}: already trained ({start} >= {tc.steps} steps)')
        return state

      t0 = time.time()
      _log_memory(stage, train_step.compile(), time.time() - t0)
      eval_jit = train_step.eval_step() if eval_iter_fn is not None else None

      logger = tlog.MetricsLogger(stage_dir, start_step=start, enabled=jax.process_index() == 0)
      last_saved = latest
      bar = progress.Progress(stage, tc.steps, 'steps', every=tc.log_every, start=start)

      def check(step_no, metrics, window):
        host = jax.device_get(metrics)
        bad = [k for k in ('loss', 'grad_norm') if not math.isfinite(float(host[k]))]
        if bad:
          mngr.wait_until_finished()
          raise NonFiniteLoss(stage, step_no, {k: float(host[k]) for k in bad},
                              mngr.latest_step(), directory)
        window.append(host)

      def evaluate(step_no):
        params = state.ema_params if state.ema_params is not None else state.params
        out = {}
        if eval_jit is not None:
          sums, n = None, 0
          for local in eval_iter_fn():
            m = eval_jit(params, put_batch(local, mesh))
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
            n += 1
          if n:
            out = {f'eval/{k}': float(v) / n for k, v in jax.device_get(sums).items()}
        if task.on_eval is not None:
          out.update(task.on_eval(params, step_no, stage_dir) or {})
        return out

      window, pending = [], None
      t_win, s_win = time.time(), start
      every_s = 60.0 * float(tc.get('checkpoint_minutes', 0) or 0)
      t_saved = time.monotonic()
      for step_no in range(start, tc.steps):
        due = every_s > 0 and time.monotonic() - t_saved >= every_s
        preempted, timed = sigterm.agree(step_no, due)
        if preempted or (timed and last_saved != step_no):
          if pending is not None:
            check(*pending, window)
            pending = None
          if last_saved != step_no:
            ckpt.save(mngr, step_no, state, it)
            last_saved, t_saved = step_no, time.monotonic()
            logger.flush()
          if preempted:
            mngr.wait_until_finished()
            raise Preempted(stage, step_no, directory)
        batch = put_batch(next(it), mesh)
        state, metrics = train_step.step(state, batch)
        if pending is not None:          # check step n-1 while step n runs: no pipeline stall
          check(*pending, window)
        pending = (step_no, metrics)
        done = step_no + 1
        last = done == tc.steps
        do_ckpt = done % tc.checkpoint_every == 0 or last
        do_eval = (eval_jit is not None or task.on_eval is not None) and (
            done % tc.eval_every == 0 or last)
        do_log = done % tc.log_every == 0 or last or do_eval
        if not (do_ckpt or do_eval or do_log):
          bar.update(done)
          continue
        check(*pending, window)           # everything saved or logged was verified finite
        pending = None
        if do_ckpt:
          ckpt.save(mngr, done, state, it)
          last_saved, t_saved = done, time.monotonic()
        record = {}
        if do_log:
          now = time.time()
          sps = (done - s_win) / max(now - t_win, 1e-9)
          keys = window[-1].keys()
          record = {k: float(np.mean([w[k] for w in window])) for k in keys}
          record['lr'] = float(window[-1]['lr'])
          record['steps_per_sec'] = sps
          t_win, s_win, window = now, done, []
        if do_eval:
          record.update(evaluate(done))
          t_win = time.time()             # eval time is not training throughput
        if do_log:
          logger.write(done, record)
        bar.update(done, **({'loss': record['loss']} if do_log else {}))
        if do_ckpt:
          logger.flush()                  # the log is durable up to the checkpoint
      mngr.wait_until_finished()
      bar.close()
      return state
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if logger is not None:
      logger.close()
