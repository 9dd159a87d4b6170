"""The one way a long loop tells the user how far it is (training, prepare, sample, evaluate).

On a terminal: one live line, redrawn in place, with the count, rate and ETA. Otherwise (a log
file, a pipe, a scheduler's output): one plain line every `every` items and at the end, so logs
stay short and greppable. In a multi-process run only process 0 prints.
"""
from __future__ import annotations

import sys
import time


def _process_index():
  import jax
  return jax.process_index()


def say(msg: str, process_index=None, stream=None) -> None:
  """One line on stdout from process 0 (every process may call it)."""
  if (_process_index() if process_index is None else process_index) == 0:
    print(msg, file=stream or sys.stdout, flush=True)


def fmt_time(seconds: float) -> str:
  """h:mm:ss or m:ss; '?' when unknown."""
  if seconds != seconds or seconds == float('inf'):
    return '?'
  s = int(max(seconds, 0))
  h, m = divmod(s, 3600)
  m, s = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
  """Progress of `total` items (steps, notes, shards) of a named task.

    bar = Progress('sample', total=96, unit='notes', every=16)
    for i in ...: bar.update(i + 1)
    bar.close()

  `update(done, **info)` takes the absolute count (so a resumed loop starts at `start`) and
  optional values shown after it (loss=0.12). Rate and ETA count from construction, items
  before `start` excluded. `every` (non-terminal output) defaults to a tenth of the total.
  `process_index` and `stream` default to jax.process_index() and sys.stdout (tests pass them).
  """

  def __init__(self, name, total, unit='steps', every=None, start=0, stream=None,
               process_index=None, clock=time.monotonic, redraw_s=0.2):
    self.name, self.total, self.unit = name, int(total), unit
    self.every = max(1, int(every or max(self.total // 10, 1)))
    self.start = self.done = int(start)
    self.stream = stream or sys.stdout
    self.enabled = (_process_index() if process_index is None else process_index) == 0
    isatty = getattr(self.stream, 'isatty', None)
    self.live = bool(isatty and isatty())
    self._clock, self._redraw_s = clock, redraw_s
    self._t0 = clock()
    self._drawn = None     # when the live line was last drawn
    self._printed = None   # the count of the last plain line
    self.info = {}

  def rate(self) -> float:
    dt = self._clock() - self._t0
    return (self.done - self.start) / dt if dt > 0 else 0.0

  def line(self) -> str:
    rate = self.rate()
    eta = (self.total - self.done) / rate if rate > 0 else float('inf')
    pct = 100.0 * self.done / self.total if self.total else 100.0
    extra = ''.join(f' {k} {v:.5g}' if isinstance(v, float) else f' {k} {v}'
                    for k, v in self.info.items())
    return (f'[{self.name}] {self.done}/{self.total} {self.unit} ({pct:.0f}%){extra} '
            f'{rate:.3g} {self.unit}/s eta {fmt_time(eta)}')

  def update(self, done, **info) -> None:
    self.done = int(done)
    self.info.update(info)
    if not self.enabled:
      return
    last = self.done >= self.total
    if self.live:
      now = self._clock()
      if last or self._drawn is None or now - self._drawn >= self._redraw_s:
        self.stream.write('\r\033[K' + self.line() + ('\n' if last else ''))
        self.stream.flush()
        self._drawn = None if last else now
    elif (self.done % self.every == 0 or last) and self._printed != self.done:
      print(self.line(), file=self.stream, flush=True)
      self._printed = self.done

  def close(self) -> None:
    """Ends the live line (a loop stopped before `total` leaves it otherwise unfinished)."""
    if self.enabled and self.live and self._drawn is not None:
      self.stream.write('\n')
      self.stream.flush()
      self._drawn = None
