"""Orbax checkpoints of the train state plus the grain iterator position, per stage.

Layout: <stage_dir>/checkpoints/<step>/{state, data_iter}. `state` is the sharded TrainState
(restored into an abstract target that carries the *current* shardings, so a checkpoint written on
one mesh loads on another); `data_iter` is grain's per-process JSON
(process_<i>-of-<n>.json, written by grain.checkpoint.CheckpointHandler), so a restore needs the
same process count. Saves are async: arrays are copied to host before `save` returns, so the
caller may donate the state to the next step right away.
"""
from __future__ import annotations

import json
import os
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mars_jax import fs

ITEMS = ('state', 'data_iter')
# Files orbax and grain write as JSON inside a step folder: a truncated one fails to parse.
JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'metadata')


class CheckpointError(RuntimeError):
  """No intact checkpoint could be restored; the message names the folder and each bad step."""


def step_dir(directory: str, step: int) -> str:
  return fs.join(_orbax_path(directory), str(int(step)))


def _walk(p):
  """Every file under epath `p` (local or gs://), as (relative path, epath.Path)."""
  out, stack = [], [(p, '')]
  while stack:
    d, rel = stack.pop()
    for child in d.iterdir():
      r = f'{rel}{child.name}'
      if child.is_dir():
        stack.append((child, r + '/'))
      else:
        out.append((r, child))
  return sorted(out, key=lambda x: x[0])


def files(directory: str, step: int) -> dict:
  """{relative path: bytes} of the files of one step (what mark_complete records)."""
  return {rel: int(f.stat().length) for rel, f in _walk(fs.path(step_dir(directory, step)))}


def check_files(directory: str, step: int, recorded: dict | None = None) -> str | None:
  """Cheap check of one step: present, every JSON file parses and, when `recorded` (from
  `files`) is given, every file still has its size. Returns what is wrong, or None."""
  root = fs.path(step_dir(directory, step))
  if not root.exists():
    return f'{root} is missing'
  try:
    now = dict((rel, f) for rel, f in _walk(root))
    for rel, f in now.items():
      name = rel.rsplit('/', 1)[-1]
      if name.endswith('.json') or name in JSON_FILES:
        try:
          json.loads(f.read_bytes())
        except ValueError as e:
          return f'{root}/{rel} is not valid JSON ({e})'
    for rel, size in (recorded or {}).items():
      if rel not in now:
        return f'{root}/{rel} is missing'
      got = int(now[rel].stat().length)
      if got != size:
        return f'{root}/{rel} has {got} bytes, {size} when written'
  except OSError as e:
    return f'{root}: {type(e).__name__}: {e}'
  return None


def verify(directory: str, step: int) -> str | None:
  """Whether one step can be read at all, whatever model it is restored into: its JSON files
  parse and every array of its state reads back. Returns what is wrong, or None."""
  bad = check_files(directory, step)
  if bad:
    return bad
  path = fs.join(step_dir(directory, step), 'state')
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(path)
      meta = getattr(meta, 'item_metadata', meta)
      tree = getattr(meta, 'tree', meta)
      # Every array back as numpy on this host: no target, no shardings, no devices needed.
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      ckptr.restore(path, restore_args=restore_args)
  except Exception as e:  # noqa: BLE001 - any failure to read is damage
    return f'{path}: {type(e).__name__}: {str(e)[:300]}'
  return None


def _first_restorable(directory, steps, restore_one, what):
  """Tries restore_one(step) from the newest of `steps` down. A step that fails and does not
  `verify` is damaged: warned about, skipped. A step that fails but verifies is re-raised (the
  target does not fit the checkpoint: a config problem, not damage). Returns (step, value,
  [(bad step, reason)])."""
  bad = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore_one(step), bad
    except Exception:  # noqa: BLE001 - classified just below
      reason = verify(directory, step)
      if reason is None:
        raise
      logging.warning('%s: checkpoint step %d in %s is damaged (%s); trying the previous one.',
                      what, step, directory, reason)
      bad.append((step, reason))
  err = CheckpointError(
      f'no intact checkpoint in {directory}: ' + '; '.join(f'step {s}: {r}' for s, r in bad)
      + '.')
  err.bad = bad
  raise err


def set_aside(directory: str, step: int) -> str:
  """Moves a damaged step out of the checkpoints folder (so orbax neither lists it nor refuses
  to save that step again) to <stage>/checkpoints-damaged/<step>-<time>; returns where."""
  src = fs.path(step_dir(directory, step))
  dst = fs.path(fs.join(_orbax_path(directory) + '-damaged', f'{int(step)}-{int(time.time())}'))
  if not fs.is_remote(src):
    os.makedirs(os.fspath(dst.parent), exist_ok=True)
    os.replace(os.fspath(src), os.fspath(dst))
  else:   # object stores have no rename: copy, then delete
    for rel, f in _walk(src):
      fs.write_bytes(fs.join(os.fspath(dst), rel), f.read_bytes())
    src.rmtree()
  return os.fspath(dst)


def ckpt_dir(stage_dir: str) -> str:
  return fs.join(fs.absolute(stage_dir), 'checkpoints')


def _orbax_path(directory: str) -> str:
  """The path orbax opens: absolute locally, a gs:// URI unchanged (orbax writes it natively)."""
  return fs.absolute(directory)


def _single_process_array_writes():
  """One process writes every array from one device's copy, unsliced.

  Orbax's default on CPU and TPU ("replica-parallel") splits each replicated array into a slice
  per device so that several hosts share the write. With one process every slice is written by
  the same host anyway, and each costs an eager jax slice (a compile per new shape): with the
  tiny models' ~470 replicated leaves on 8 devices, 3,700 slices and 1.3-4.5 s of blocked
  training per save, against 0.1-0.25 s without. Several processes keep orbax's default.
  The handler writes no per-process `array_metadatas` files: orbax keeps typed PRNG-key types
  there, and a TrainState's keys are raw uint32 arrays."""
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def manager(directory: str, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager that keeps the newest `keep` steps; the engine decides *when* to save."""
  _single_process_array_writes()
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(_orbax_path(directory), options=options, item_names=ITEMS)


class _Snapshot:
  """The iterator state taken *now*, so a later-running save cannot see a moved iterator.

  grain's handler stores `get_state().decode()` for non-DatasetIterator items; the JSON we hand it
  is byte-identical to what it writes for a DatasetIterator, so either restore path reads it.
  """

  def __init__(self, state):
    self._b = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self):
    return self._b


class _Restorer:
  """Adapter grain's handler restores into: forwards JSON (dict) or raw bytes to the iterator."""

  def __init__(self, it):
    self.it = it
    self._as_dict = not isinstance(it.get_state(), bytes)

  def set_state(self, b: bytes):
    self.it.set_state(json.loads(b) if self._as_dict else b)

  def start_prefetch(self):
    if hasattr(self.it, 'start_prefetch'):
      self.it.start_prefetch()


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter=None) -> bool:
  """Starts an async save of `state` (and the iterator position) at `step`."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter is not None:
    items['data_iter'] = grain.checkpoint.CheckpointSave(_Snapshot(data_iter.get_state()))
  return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
  """Restores `state` into `abstract_state` (ShapeDtypeStructs with shardings) and the iterator
  from `step`, or, when that step is damaged (truncated files, bad JSON), from the newest intact
  earlier one: each damaged step is named in a warning and set aside (set_aside), so training
  resumes from there and saves those steps again."""
  directory = os.fspath(mngr.directory)

  def one(s):
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(_Restorer(data_iter))
    return mngr.restore(s, args=ocp.args.Composite(**items))['state']

  steps = [s for s in mngr.all_steps() if s <= step]
  try:
    got, state, bad = _first_restorable(directory, steps, one, 'resume')
  except CheckpointError as e:
    _set_aside_all(directory, e.bad, None)
    raise CheckpointError(f'{e} Every step was set aside to {directory}-damaged/; rerun to '
                          f'train this stage from scratch.') from e
  if bad:
    _set_aside_all(directory, bad, got)
    mngr.reload()
  return state


def _set_aside_all(directory, bad, resumed):
  _sync('mars_jax/ckpt_damaged')          # every process has read before anything moves
  if jax.process_index() == 0:
    for s, _ in bad:
      where = set_aside(directory, s)
      if resumed is None:
        logging.warning('damaged step %d moved to %s', s, where)
      else:
        logging.warning('resuming from step %d; damaged step %d moved to %s', resumed, s, where)
  _sync('mars_jax/ckpt_set_aside')


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def restore_params(directory: str, abstract_params, step: int | None = None, ema: bool = True):
  """Loads only the (EMA, when saved and `ema`) params of the latest step: a frozen model.

  `directory` is a stage's checkpoints folder (e.g. WORKDIR/tokenizer/checkpoints);
  `abstract_params` is a tree of jax.ShapeDtypeStruct with `.sharding` set (e.g. from
  `engine.abstract_params(task, config, mesh, local_batch)`), so the params land already
  sharded on the caller's mesh. Optimizer state is never read.
  """
  directory = _orbax_path(directory)
  # A PyTree handler for 'state' lets us read its metadata (is there an EMA?) and restore a part;
  # naming data_iter's handler and the read-only implications keeps orbax from warning about them.
  mngr = ocp.CheckpointManager(
      directory,
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data_iter': grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0))
  try:
    steps = mngr.all_steps() if step is None else [step]
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory}; run its stage first.')

    def one(s):
      meta = mngr.item_metadata(s)['state']
      meta = getattr(meta, 'tree', meta)
      key = 'ema_params' if ema and _has(meta, 'ema_params') else 'params'
      restore_args = jax.tree.map(
          lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                         dtype=x.dtype), abstract_params)
      args = ocp.args.PyTreeRestore(item={key: abstract_params},
                                    restore_args={key: restore_args}, partial_restore=True)
      return mngr.restore(s, args=ocp.args.Composite(state=args))['state'][key]

    try:
      got, params, bad = _first_restorable(directory, steps, one, 'load')
    except CheckpointError as e:
      parent = os.path.dirname(directory.rstrip('/'))
      stage = ('evaluate' if os.path.basename(os.path.dirname(parent)) == 'eval'
               else os.path.basename(parent))
      raise CheckpointError(f'{e} Rerun its stage (--stages={stage}): it sets the damaged steps '
                            f'aside and retrains.') from e
    if bad:
      logging.warning('loaded step %d of %s instead of damaged step(s) %s.', got, directory,
                      ', '.join(str(s) for s, _ in bad))
    return params
  finally:
    mngr.close()


def _has(meta, key) -> bool:
  try:
    v = meta[key]
  except (KeyError, TypeError):
    v = getattr(meta, key, None)
  return v is not None and jax.tree.leaves(v) != []
