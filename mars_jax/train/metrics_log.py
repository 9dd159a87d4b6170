"""Process-0 metric sinks: metrics.jsonl (the contract), TensorBoard scalars, one progress line.

TensorBoard events are written by a ~40-line writer below (TFRecord framing + hand-encoded
`Event`/`Summary` protos, scalars only) so no TensorFlow, tensorboard or torch is needed; the
files open in any TensorBoard. metrics.jsonl stays the source of truth other tools read.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

from mars_jax import fs


# --- TensorBoard scalar events without dependencies --------------------------------------------


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:     # wire type 2 (length-delimited)
  return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version=None, scalars=None) -> bytes:
  """Serialises tensorflow.Event{wall_time=1, step=2, file_version=3, summary=5}."""
  msg = _varint(1 << 3 | 1) + struct.pack('<d', wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b''
    for tag, value in scalars.items():    # Summary.Value{tag=1, simple_value=2 (float)}
      v = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack('<f', value)
      summary += _field_bytes(1, v)
    msg += _field_bytes(5, summary)
  return msg


class TensorBoardWriter:
  """Appends scalar summaries to an events.out.tfevents.* file (TFRecord framed)."""

  def __init__(self, logdir: str):
    fs.makedirs(logdir)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = fs.join(logdir, name)
    self._f = fs.AppendLog(self.path, binary=True)
    self._record(_event(time.time(), 0, file_version='brain.Event:2'))

  def _record(self, data: bytes):
    header = struct.pack('<Q', len(data))
    self._f.write(header + struct.pack('<I', _masked_crc(header)) + data +
                  struct.pack('<I', _masked_crc(data)))

  def scalars(self, step: int, values: dict):
    values = {k: float(v) for k, v in values.items() if _is_number(v)}
    if values:
      self._record(_event(time.time(), int(step), scalars=values))
      self._f.flush()

  def flush(self):
    self._f.flush(force=True)

  def close(self):
    self._f.close()


# --- metrics.jsonl + progress ------------------------------------------------------------------


def say(fmt: str, *args):
  """A user-facing progress line on process 0's stdout (library INFO logs stay quiet)."""
  import jax
  if jax.process_index() == 0:
    print(fmt % args if args else fmt, flush=True)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v):
  """JSON-safe scalar (NaN/Inf become strings so every line stays valid JSON)."""
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  h, m = divmod(s, 3600)
  m, s = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class MetricsLogger:
  """Writes metrics from process 0 only (other processes hold the same replicated scalars)."""

  def __init__(self, stage_dir: str, name: str, total_steps: int, start_step: int = 0,
               enabled: bool = True, tensorboard: bool = True):
    self.name, self.total, self.enabled = name, total_steps, enabled
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

  def progress(self, step: int, loss: float, steps_per_sec: float, extra: str = ''):
    """A single line: stage step/total, loss, steps/s, ETA."""
    if not self.enabled:
      return
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float('inf')
    eta_s = _fmt_time(eta) if math.isfinite(eta) else '?'
    say('%s step %d/%d loss %.5g %.2f steps/s eta %s%s', self.name, step, self.total,
                 loss, steps_per_sec, eta_s, extra)

  def close(self):
    if not self.enabled:
      return
    self._f.close()
    if self._tb is not None:
      self._tb.close()
