"""What the training stages share: their folders, config fingerprints and completion markers."""
import json

from mars_jax import config as config_lib
from mars_jax import distributed
from mars_jax import fs
from mars_jax.data import prepare


def stage_fingerprint(config, *sections):
  return config_lib.fingerprint(config, 'seed', 'data', 'spectrogram', 'cmx', *sections,
                                exclude=prepare._NOT_CONTENT)


def data_dir(workdir):
  return prepare.data_dir(workdir)


def _marker(stage_dir):
  return fs.join(stage_dir, 'fingerprint.json')


def read_marker(stage_dir):
  """stage_dir/fingerprint.json ({'fingerprint', 'complete', ...}), or None if absent or
  unreadable."""
  try:
    m = json.loads(fs.read_text(_marker(stage_dir)))
  except (OSError, ValueError):
    return None
  return m if isinstance(m, dict) else None


def claim(stage_dir, fingerprint, stage):
  """Records which config owns `stage_dir`; refuses to resume checkpoints of another config."""
  fs.makedirs(stage_dir)
  old = read_marker(stage_dir)
  if (old is not None and old.get('fingerprint') != fingerprint
      and fs.exists(fs.join(stage_dir, 'checkpoints'))):
    raise config_lib.ConfigError(
        f'{stage_dir} holds {stage} checkpoints trained with another config '
        f'(fingerprint {old.get("fingerprint")}, now {fingerprint}); use another --workdir, or '
        f'delete {stage_dir} to retrain.')
  if distributed.is_main():
    fs.write_text(_marker(stage_dir), json.dumps({'fingerprint': fingerprint, 'complete': False}))


def _final_checkpoint(stage_dir):
  """{'step', 'files': {path: bytes}} of the newest step in stage_dir/checkpoints, or None."""
  from mars_jax.train import checkpoint
  d = fs.path(fs.join(stage_dir, 'checkpoints'))
  if not d.exists():
    return None
  steps = sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())
  if not steps:
    return None
  cdir = checkpoint.ckpt_dir(stage_dir)
  return {'step': steps[-1], 'files': checkpoint.files(cdir, steps[-1])}


def mark_complete(stage_dir, fingerprint, **extra):
  """Marks stage_dir complete for `fingerprint`; a training stage's marker also records the
  final checkpoint's files and sizes, so damage to it later undoes "complete"."""
  if not distributed.is_main():
    return
  final = _final_checkpoint(stage_dir)
  if final is not None:
    extra = {**extra, 'checkpoint': final}
  fs.write_text(_marker(stage_dir),
                json.dumps({'fingerprint': fingerprint, 'complete': True, **extra}, indent=2))


def is_complete(stage_dir, fingerprint):
  """Marked complete for `fingerprint` and, for a training stage, its final checkpoint is as it
  was written (present, same file sizes, JSON metadata intact)."""
  m = read_marker(stage_dir)
  if not (m and m.get('complete', False) and m.get('fingerprint') == fingerprint):
    return False
  final = m.get('checkpoint')
  if final is not None:
    from mars_jax.train import checkpoint
    bad = checkpoint.check_files(checkpoint.ckpt_dir(stage_dir), final['step'], final['files'])
    if bad:
      print(f'[{stage_dir}] marked complete, but its final checkpoint is damaged ({bad}): '
            f'not complete.', flush=True)
      return False
  return True


def train_on_prepared(task, config, stage, stage_dir, workdir, fingerprint):
  """Trains `task` with the engine on the prepared train split, evaluating on valid, then marks
  `stage_dir` complete for `fingerprint`. Returns the final TrainState."""
  import jax
  from mars_jax.data import pipeline
  from mars_jax.train import engine
  ddir = data_dir(workdir)
  batch = config[stage].train.batch_size
  procs = jax.process_count()
  eval_batch = max(batch // procs, 1) * procs
  state = engine.train(
      task, config, stage, stage_dir,
      train_iter_fn=lambda: pipeline.make_iterator(config, ddir, 'train', batch_size=batch),
      eval_iter_fn=lambda: pipeline.eval_batches(config, ddir, 'valid', batch_size=eval_batch))
  mark_complete(stage_dir, fingerprint, step=int(jax.device_get(state.step)))
  return state
