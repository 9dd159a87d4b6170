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

import grain
import jax
import orbax.checkpoint as ocp

from mars_jax import fs

ITEMS = ('state', 'data_iter')


def ckpt_dir(stage_dir: str) -> str:
  return fs.join(fs.absolute(stage_dir), 'checkpoints')


def _orbax_path(directory: str) -> str:
  """The path orbax opens: absolute locally, a gs:// URI unchanged (orbax writes it natively)."""
  return fs.absolute(directory)


def manager(directory: str, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager that keeps the newest `keep` steps; the engine decides *when* to save."""
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
  """Restores `state` into `abstract_state` (ShapeDtypeStructs with shardings) and the iterator."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items['data_iter'] = grain.checkpoint.CheckpointRestore(_Restorer(data_iter))
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored['state']


def restore_params(directory: str, abstract_params, step: int | None = None, ema: bool = True):
  """Loads only the (EMA, when saved and `ema`) params of the latest step: a frozen model.

  `directory` is a stage's checkpoints folder (e.g. WORKDIR/tokenizer/checkpoints);
  `abstract_params` is a tree of jax.ShapeDtypeStruct with `.sharding` set (e.g. from
  `engine.abstract_params(task, config, stage, mesh, batch)`), so the params land already
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
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}; run its stage first.')
    meta = mngr.item_metadata(step)['state']
    meta = getattr(meta, 'tree', meta)
    key = 'params'
    if ema and _has(meta, 'ema_params'):
      key = 'ema_params'
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract_params)
    args = ocp.args.PyTreeRestore(item={key: abstract_params},
                                  restore_args={key: restore_args}, partial_restore=True)
    restored = mngr.restore(step, args=ocp.args.Composite(state=args))
    return restored['state'][key]
  finally:
    mngr.close()


def _has(meta, key) -> bool:
  try:
    v = meta[key]
  except (KeyError, TypeError):
    v = getattr(meta, key, None)
  return v is not None and jax.tree.leaves(v) != []
