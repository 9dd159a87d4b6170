"""Process-0 metric sinks: metrics.jsonl (the contract) and TensorBoard scalars.

TensorBoard events are written with tensorboardX (TFRecord framing and the Event protos, no
TensorFlow or torch needed); metrics.jsonl stays the source of truth other tools read.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time

from tensorboardX import record_writer
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2, summary_pb2

from mars_jax import fs


# --- TensorBoard scalar events -----------------------------------------------------------------


class _ObjectStoreFiles:
  """tensorboardX's opener for gs:// and s3:// event files: through fs.AppendLog, which re-uploads
  the whole object (a bucket has no append) at most every 30 s, and on demand at checkpoints.
  tensorboardX's own openers would need google-cloud-storage or boto3; this one uses what the
  rest of the workdir uses (epath)."""

  def __init__(self):
    self.open_logs = {}

  def open(self, path):
    log = self.open_logs[path] = fs.AppendLog(path, binary=True)
    return log

  def directory_check(self, path):
    del path          # object stores have no folders to create


_OBJECT_STORE = _ObjectStoreFiles()
for _scheme in fs.REMOTE_SCHEMES:
  record_writer.register_writer_factory(_scheme.split(':')[0], _OBJECT_STORE)


class TensorBoardWriter:
  """Appends scalar summaries to one events.out.tfevents.* file in `logdir` (local or remote)."""

  def __init__(self, logdir: str):
    fs.makedirs(logdir)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = fs.join(logdir, name)
    self._records = record_writer.RecordWriter(self.path)
    self._write(event_pb2.Event(wall_time=time.time(), step=0, file_version='brain.Event:2'))

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def scalars(self, step: int, values: dict):
    """One event per step holding every numeric value (strings such as 'nan' are skipped)."""
    found = [v for tag, value in values.items() if _is_number(value)
             for v in tb_summary.scalar(tag, float(value)).value]
    if found:
      summary = summary_pb2.Summary(value=found)
      self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
      self._records.flush()     # remote: uploaded at most every 30 s

  def flush(self):
    """Makes the file durable: locally flushed, remotely uploaded now."""
    self._records.flush()
    if self.path in _OBJECT_STORE.open_logs:
      _OBJECT_STORE.open_logs[self.path].flush(force=True)

  def close(self):
    self._records.close()
    _OBJECT_STORE.open_logs.pop(self.path, None)


# --- metrics.jsonl -----------------------------------------------------------------------------


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v):
  """JSON-safe scalar (NaN/Inf become strings so every line stays valid JSON)."""
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsLogger:
  """Writes metrics from process 0 only (other processes hold the same replicated scalars)."""

  def __init__(self, stage_dir: str, start_step: int = 0, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = fs.join(stage_dir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    fs.makedirs(stage_dir)
    self._truncate_after(start_step)
    self._f = fs.AppendLog(self.path)
    if tensorboard:
      self._tb = TensorBoardWriter(fs.join(stage_dir, 'tensorboard'))

  def _truncate_after(self, step: int):
    """On resume, drop lines logged after the restored checkpoint: they are recomputed."""
    if not fs.exists(self.path):
      return
    keep = []
    for line in fs.read_text(self.path).splitlines(keepends=True):
      try:
        if json.loads(line)['step'] <= step:
          keep.append(line)
      except (ValueError, KeyError, TypeError):
        pass
    fs.write_text(self.path, ''.join(keep))

  def write(self, step: int, metrics: dict):
    """One JSON object per call: {"step": .., "loss": .., ...}."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._f.write(json.dumps(record) + '\n')
    self._f.flush()
    if self._tb is not None:
      self._tb.scalars(step, {k: v for k, v in record.items() if k != 'step'})

  def flush(self):
    """Makes everything logged so far durable (called with each checkpoint; on a remote
    workdir lines are otherwise uploaded at most every 30 s)."""
    if not self.enabled:
      return
    self._f.flush(force=True)
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if not self.enabled:
      return
    self._f.close()
    if self._tb is not None:
      self._tb.close()
