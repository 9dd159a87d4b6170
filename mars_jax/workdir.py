"""The workdir: where each part of a run lives, which config made it, whether it is complete, and
whether a new run may touch it.

Layout (a contract other tools read; README "Workdir layout"): DIR/config.json, DIR/data/ (the
prepared shards and manifest.json), DIR/tokenizer/ and DIR/autoregressor/ (checkpoints,
metrics.jsonl), DIR/samples/ (wavs + samples.json), DIR/eval/ (metrics.json and the classifiers'
folders), DIR/report.html. Each folder but data/ holds fingerprint.json: the fingerprint of the
config sections that made it (`SECTIONS`) and whether it is complete.

A workdir accumulates work of one config: data/ prepared for it, checkpoints trained on that data,
samples of those checkpoints. A run with another config must not silently mix with it (data
re-prepared under checkpoints trained on the old data, a config.json that no longer describes the
models). `check_run` looks at everything a run would touch and either accepts it, refuses it with
a ConfigError that says what conflicts and what to do, or, under --force, returns the list of
folders of the other config that the run would invalidate, which `apply` deletes (after saying so).

`check_generator` is the same idea for the Python API: the tokenizer, the autoregressor and the
data it reads the vocabulary from must all belong to the config it is given.
"""
from __future__ import annotations

import dataclasses
import json

from mars_jax import config as config_lib
from mars_jax import fs
from mars_jax.config import ConfigError
from mars_jax.data import prepare as data_prepare
from mars_jax.data import records

# --- layout -------------------------------------------------------------------------------------

CONFIG_JSON = 'config.json'
REPORT = 'report.html'
SAMPLES_JSON = 'samples.json'
METRICS_JSON = 'metrics.json'
MARKER = 'fingerprint.json'
CLASSIFIER_TARGETS = ('pitch', 'instrument')
# The folder of each stage's output.
FOLDERS = {'prepare': 'data', 'tokenizer': 'tokenizer', 'autoregressor': 'autoregressor',
           'sample': 'samples', 'evaluate': 'eval'}
# The config sections each part's fingerprint covers (`config.NOT_CONTENT` left out).
_INPUT = ('seed', 'data', 'spectrogram', 'cmx')
SECTIONS = {
    'prepare': data_prepare.SECTIONS,
    'tokenizer': _INPUT + ('tokenizer',),
    'autoregressor': _INPUT + ('tokenizer', 'autoregressor'),
    'sample': _INPUT + ('tokenizer', 'autoregressor', 'sample'),
    'evaluate': _INPUT + ('tokenizer', 'classifier', 'evaluate'),
    'classifier': _INPUT + ('classifier',),
}


def stage_dir(workdir, stage):
  return fs.join(workdir, FOLDERS[stage])


def data_dir(workdir):
  return stage_dir(workdir, 'prepare')


def samples_dir(workdir):
  return stage_dir(workdir, 'sample')


def eval_dir(workdir):
  return stage_dir(workdir, 'evaluate')


def classifier_dir(workdir, target):
  return fs.join(eval_dir(workdir), f'{target}_classifier')


def fingerprint(config, part):
  """A short hash of the config sections `part` ('tokenizer', 'classifier', ...) depends on."""
  return config_lib.fingerprint(config, *SECTIONS[part], exclude=config_lib.NOT_CONTENT)


def classifier_fingerprint(config, target):
  return fingerprint(config, 'classifier') + f'-{target}'


def load_manifest(workdir):
  """DIR/data/manifest.json (DataError naming the fix when absent)."""
  from mars_jax.data import pipeline
  return pipeline.load_manifest(data_dir(workdir))


def manifest_hash(workdir):
  """config_hash of DIR/data/manifest.json: None when absent, '?' when unreadable."""
  path = fs.join(data_dir(workdir), records.MANIFEST)
  if not fs.exists(path):
    return None
  try:
    return json.loads(fs.read_text(path)).get('config_hash', '?')
  except (OSError, ValueError, AttributeError):
    return '?'


def load_config(workdir):
  """The config a workdir was made with (written by the CLI as config.json)."""
  import ml_collections
  path = fs.join(workdir, CONFIG_JSON)
  if not fs.exists(path):
    raise FileNotFoundError(f'{path} is missing: is {workdir} a mars_jax workdir? '
                            f'Pass config= explicitly otherwise.')
  return ml_collections.ConfigDict(json.loads(fs.read_text(path)))


# --- completion markers -------------------------------------------------------------------------


def _marker(folder):
  return fs.join(folder, MARKER)


def read_marker(folder):
  """folder/fingerprint.json ({'fingerprint', 'complete', ...}), or None if absent or
  unreadable."""
  try:
    m = json.loads(fs.read_text(_marker(folder)))
  except (OSError, ValueError):
    return None
  return m if isinstance(m, dict) else None


def marker_fingerprint(folder):
  """The fingerprint recorded in folder/fingerprint.json, or None."""
  return (read_marker(folder) or {}).get('fingerprint')


def has_checkpoints(folder) -> bool:
  p = fs.path(fs.join(folder, 'checkpoints'))
  try:
    return p.exists() and any(True for _ in p.iterdir())
  except OSError:
    return False


def claim(folder, fingerprint, what):
  """Records which config owns `folder`; refuses to resume checkpoints of another config."""
  fs.makedirs(folder)
  old = read_marker(folder)
  if (old is not None and old.get('fingerprint') != fingerprint
      and fs.exists(fs.join(folder, 'checkpoints'))):
    raise ConfigError(
        f'{folder} holds {what} checkpoints trained with another config '
        f'(fingerprint {old.get("fingerprint")}, now {fingerprint}); use another --workdir, or '
        f'delete {folder} to retrain.')
  from mars_jax import distributed
  if distributed.is_main():
    fs.write_text(_marker(folder), json.dumps({'fingerprint': fingerprint, 'complete': False}))


def _final_checkpoint(folder):
  """{'step', 'files': {path: bytes}} of the newest step in folder/checkpoints, or None."""
  from mars_jax.train import checkpoint
  d = fs.path(fs.join(folder, 'checkpoints'))
  if not d.exists():
    return None
  steps = sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())
  if not steps:
    return None
  cdir = checkpoint.ckpt_dir(folder)
  return {'step': steps[-1], 'files': checkpoint.files(cdir, steps[-1])}


def mark_complete(folder, fingerprint, **extra):
  """Marks `folder` complete for `fingerprint`; a training folder's marker also records the
  final checkpoint's files and sizes, so damage to it later undoes "complete"."""
  from mars_jax import distributed
  if not distributed.is_main():
    return
  final = _final_checkpoint(folder)
  if final is not None:
    extra = {**extra, 'checkpoint': final}
  fs.write_text(_marker(folder),
                json.dumps({'fingerprint': fingerprint, 'complete': True, **extra}, indent=2))


def is_complete(folder, fingerprint):
  """Marked complete for `fingerprint` and, for a training folder, its final checkpoint is as it
  was written (present, same file sizes, JSON metadata intact)."""
  m = read_marker(folder)
  if not (m and m.get('complete', False) and m.get('fingerprint') == fingerprint):
    return False
  final = m.get('checkpoint')
  if final is not None:
    from mars_jax.train import checkpoint
    bad = checkpoint.check_files(checkpoint.ckpt_dir(folder), final['step'], final['files'])
    if bad:
      print(f'[{folder}] marked complete, but its final checkpoint is damaged ({bad}): '
            f'not complete.', flush=True)
      return False
  return True


def complete(config, workdir, stage):
  """Whether `stage`'s output in `workdir` is complete for `config`: the prepared data (manifest
  of this config, every shard intact) or a folder marked complete with this config's
  fingerprint. (The evaluate stage adds its own inputs: see stages.evaluate.is_complete.)"""
  if stage == 'prepare':
    return data_prepare.is_prepared(config, data_dir(workdir))
  return is_complete(stage_dir(workdir, stage), fingerprint(config, stage))


# --- what a run may touch -----------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
  """A folder of trained checkpoints: what writes it and what it was trained on."""
  name: str            # for messages: 'tokenizer', 'pitch classifier', ...
  path: str
  stage: str           # the pipeline stage that trains it
  upstream: tuple      # stages whose output it was trained on
  fingerprint: str     # of the config under test


def trained_folders(config, workdir):
  out = [Trained('tokenizer', stage_dir(workdir, 'tokenizer'), 'tokenizer', ('prepare',),
                 fingerprint(config, 'tokenizer')),
         Trained('autoregressor', stage_dir(workdir, 'autoregressor'), 'autoregressor',
                 ('prepare', 'tokenizer'), fingerprint(config, 'autoregressor'))]
  for t in CLASSIFIER_TARGETS:
    out.append(Trained(f'{t} classifier', classifier_dir(workdir, t), 'evaluate',
                       ('prepare',), classifier_fingerprint(config, t)))
  return out


def foreign_checkpoints(config, workdir):
  """[(Trained, recorded fingerprint)] of the folders holding checkpoints of another config."""
  out = []
  for t in trained_folders(config, workdir):
    if has_checkpoints(t.path):
      fp = marker_fingerprint(t.path)
      if fp != t.fingerprint:
        out.append((t, fp))
  return out


@dataclasses.dataclass
class Plan:
  """An accepted run: what --force deletes first (empty without conflicts)."""
  delete: list = dataclasses.field(default_factory=list)   # [(path, why)]
  notes: list = dataclasses.field(default_factory=list)


def check_run(config, workdir, stages, force=False, num_devices=None, num_processes=1) -> Plan:
  """Checks a run of `stages` with `config` against what `workdir` holds; writes nothing.

  Raises ConfigError when the run would replace data or checkpoints made with another config
  (unless `force`: then the returned Plan lists the folders to delete), when a stage's input is
  neither in the workdir for this config nor produced by an earlier stage of the run, or when a
  training stage's batch does not split over the devices.
  """
  stages = list(stages)
  if num_devices is not None:
    for st in ('tokenizer', 'autoregressor'):
      if st in stages:
        config_lib.validate_batch(config, st, num_devices, num_processes)
    if 'evaluate' in stages and 'classifier' in config:
      config_lib.validate_batch(config, 'classifier', num_devices, num_processes)
  if not fs.exists(workdir):
    _check_inputs(config, workdir, stages, set())
    return Plan()

  # Which stages of this run write new content (as opposed to finding it done or resuming it)?
  old_data = manifest_hash(workdir)
  new_data = data_prepare.config_hash(config)
  data_replaced = 'prepare' in stages and old_data is not None and old_data != new_data
  writes = {'prepare': data_replaced}
  for st in ('tokenizer', 'autoregressor'):
    writes[st] = st in stages and not complete(config, workdir, st)

  conflicts = []   # (Trained, reason)
  for t, fp in foreign_checkpoints(config, workdir):
    if t.stage in stages:
      conflicts.append((t, f'holds {t.name} checkpoints trained with another config '
                           f'(fingerprint {fp}, this config {t.fingerprint}), which the '
                           f'{t.stage} stage would resume'))
      continue
    for up in t.upstream:
      if writes.get(up):
        what = ('re-prepare DIR/data (now prepared for config ' + str(old_data) + ', this config '
                + new_data + ')') if up == 'prepare' else f'retrain DIR/{up}'
        conflicts.append((t, f'holds {t.name} checkpoints trained on what this run would '
                             f'replace: the {up} stage would {what}'))
        break

  if conflicts:
    dead = [t.path for t, _ in conflicts]
    delete = [(t.path, f'{t.name} checkpoints of another config') for t, _ in conflicts]
    samples = samples_dir(workdir)
    if (fs.exists(samples) and marker_fingerprint(samples) != fingerprint(config, 'sample')
        and any(t.stage in ('tokenizer', 'autoregressor') for t, _ in conflicts)):
      delete.append((samples, 'samples of the deleted models'))
    for p in (fs.join(eval_dir(workdir), METRICS_JSON), _marker(eval_dir(workdir)),
              fs.join(workdir, REPORT)):
      if fs.exists(p):
        delete.append((p, 'evaluation of the deleted work'))
    listing = '; '.join(f'{t.path} {why}' for t, why in conflicts)
    if not force:
      raise ConfigError(
          f'this run does not match what {workdir} holds, and nothing was changed: {listing}. '
          f'Use a new --workdir for this config, or rerun with --force to delete '
          f'{", ".join(p for p, _ in delete)} (work of the other config) and start them over.')
    plan = Plan(delete=delete)
    if data_replaced:
      plan.notes.append(f'{data_dir(workdir)} is re-prepared for this config.')
    _check_inputs(config, workdir, stages, set(dead))
    return plan
  _check_inputs(config, workdir, stages, set())
  return Plan()


def _check_inputs(config, workdir, stages, deleted):
  """Every stage's input is in the workdir for this config, or an earlier stage of the run makes
  it (checked before anything runs, so a refused run writes nothing, config.json included)."""
  need = {'tokenizer': 'prepare', 'autoregressor': 'tokenizer', 'sample': 'autoregressor'}
  for st in stages:
    dep = need.get(st)
    if dep is None or dep in stages:
      continue
    ok = ((dep == 'prepare' or stage_dir(workdir, dep) not in deleted)
          and complete(config, workdir, dep))
    if not ok:
      raise ConfigError(
          f'--stages: the {st} stage needs the {dep} stage done for this config, but '
          f'{stage_dir(workdir, dep)} does not hold it (missing, unfinished, or made with '
          f'another config); add {dep} to --stages.')
  if 'evaluate' in stages:
    if 'sample' not in stages and not fs.exists(fs.join(samples_dir(workdir), SAMPLES_JSON)):
      raise ConfigError(f'--stages: the evaluate stage needs {workdir}/samples/samples.json; '
                        f'add sample to --stages (it needs a trained autoregressor).')
    for dep in ('prepare', 'tokenizer'):
      if dep not in stages and not complete(config, workdir, dep):
        raise ConfigError(f'--stages: the evaluate stage needs the {dep} stage done for this '
                          f'config in {workdir}; add {dep} to --stages.')


def apply(plan: Plan, out=print) -> None:
  """Deletes what an accepted --force run invalidates, saying what first."""
  for path, why in plan.delete:
    out(f'--force: deleting {path} ({why})')
  for note in plan.notes:
    out(f'--force: {note}')
  for path, _ in plan.delete:
    p = fs.path(path)
    if p.is_dir():
      p.rmtree()
    elif p.exists():
      p.unlink()


def check_generator(config, workdir) -> None:
  """Raises ConfigError unless DIR/data, DIR/tokenizer and DIR/autoregressor were all made with
  `config` (their recorded fingerprints), so the model, its vocabulary and its pitch range agree."""
  bad = []
  got = manifest_hash(workdir)
  if got != data_prepare.config_hash(config):
    bad.append(f'{data_dir(workdir)} (prepared for config {got}, this config '
               f'{data_prepare.config_hash(config)})')
  for name in ('tokenizer', 'autoregressor'):
    d, fp = stage_dir(workdir, name), fingerprint(config, name)
    old = marker_fingerprint(d)
    if old != fp:
      bad.append(f'{d} (trained with config {old}, this config {fp})')
  if bad:
    raise ConfigError(
        f'{workdir} does not hold a tokenizer, autoregressor and data that belong to this config: '
        f'{"; ".join(bad)}. Its config.json may describe another run; pass the config the models '
        f'were trained with (config=...), or retrain in a new workdir.')


# --- one run a workdir ---------------------------------------------------------------------------

LOCK_NAME = '.lock'
HEARTBEAT_S = 30.0       # the holder rewrites its lock this often
STALE_S = 180.0          # a lock not rewritten for this long belongs to a dead run (any host)


class WorkdirLocked(fs.WorkdirError):
  """Another run holds the workdir; the message names it (pid, host, start time)."""


def _proc_start(pid):
  """The kernel's start time of `pid` (clock ticks since boot), or None: tells a live process
  from a new one that reuses a dead holder's pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _pid_alive(pid, start):
  import os
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  now = _proc_start(pid)
  return start is None or now is None or now == start


class Lock:
  """DIR/.lock: who runs in a workdir. Taken by `acquire()` (process 0 of a job, for the whole
  job), released by `release()`; a holder that died is detected (same host: its pid is gone;
  any host: no heartbeat for STALE_S) and its lock replaced, saying so."""

  def __init__(self, workdir, out=print, clock=None):
    import time
    self.workdir, self.out = workdir, out
    self.path = fs.join(workdir, LOCK_NAME)
    self._clock = clock or time.time
    self._stop = None
    self._thread = None
    self.info = None

  def _describe(self, info):
    import datetime
    start = datetime.datetime.fromtimestamp(info.get('started', 0)).isoformat(timespec='seconds')
    beat = self._clock() - float(info.get('heartbeat', info.get('started', 0)))
    return (f'pid {info.get("pid")} on host {info.get("host")}, started {start} '
            f'(last heartbeat {beat:.0f} s ago): {info.get("command", "?")}')

  def _stale(self, info):
    import socket
    beat = self._clock() - float(info.get('heartbeat', info.get('started', 0)))
    if beat > STALE_S:
      return f'no heartbeat for {beat:.0f} s'
    if info.get('host') == socket.gethostname() and isinstance(info.get('pid'), int):
      if not _pid_alive(info['pid'], info.get('proc_start')):
        return f'process {info["pid"]} is no longer running'
    return None

  def _read(self):
    try:
      return json.loads(fs.read_text(self.path))
    except (OSError, ValueError):
      return None

  def acquire(self):
    import os
    import socket
    import sys
    import uuid
    now = self._clock()
    self.info = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': now,
                 'heartbeat': now, 'proc_start': _proc_start(os.getpid()),
                 'command': ' '.join(sys.argv)[:300], 'token': uuid.uuid4().hex}
    fs.makedirs(self.workdir)
    for _ in range(3):
      if self._create():
        break
      held = self._read()
      if held is None:             # being written this very moment, or unreadable: look again
        import time
        time.sleep(0.2)
        held = self._read()
        if held is None:
          raise WorkdirLocked(f'{self.path} exists but cannot be read; if no run is using '
                              f'{self.workdir}, delete {self.path}.')
      why = self._stale(held)
      if why is None:
        raise WorkdirLocked(
            f'{self.workdir} is in use by another run: {self._describe(held)}. One run at a '
            f'time may use a workdir: wait for it to finish, or use another --workdir. If that '
            f'run is dead, delete {self.path}.')
      self.out(f'mars_jax: replacing a stale lock on {self.workdir} ({why}): '
               f'{self._describe(held)}')
      fs.path(self.path).unlink(missing_ok=True)
    else:
      raise WorkdirLocked(f'could not take {self.path}: another run keeps taking it.')
    self._start_heartbeat()
    return self

  def _create(self) -> bool:
    """Creates the lock file if absent: atomic locally (O_EXCL); in a bucket, write then read
    back our token (object stores have no exclusive create; the window is one round trip)."""
    import os
    blob = json.dumps(self.info, indent=1)
    if fs.is_remote(self.path):
      if fs.exists(self.path):
        return False
      fs.write_text(self.path, blob)
      got = self._read()
      return bool(got) and got.get('token') == self.info['token']
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(blob)
    return True

  def _start_heartbeat(self):
    import threading
    self._stop = threading.Event()

    def beat():
      while not self._stop.wait(HEARTBEAT_S):
        held = self._read()
        if not held or held.get('token') != self.info['token']:
          return   # someone removed or replaced it: do not fight over it
        self.info['heartbeat'] = self._clock()
        try:
          fs.write_text(self.path, json.dumps(self.info, indent=1))
        except OSError:
          pass

    self._thread = threading.Thread(target=beat, name='mars_jax-lock-heartbeat', daemon=True)
    self._thread.start()

  def release(self):
    if self._stop is not None:
      self._stop.set()
      self._thread.join(timeout=5)
    held = self._read()
    if held and self.info and held.get('token') == self.info['token']:
      fs.path(self.path).unlink(missing_ok=True)
    self._stop = self._thread = None
