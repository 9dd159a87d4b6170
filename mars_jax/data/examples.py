"""What every source lists: the splits, the `Example` record and the `Source` base class.

A source (mars_jax/data/sources.py, mars_jax/data/soundfont.py) lists its examples per split
without decoding audio. An `Example` carries everything a worker needs and is picklable: `load`
is a file path or a picklable callable returning (wave, sample_rate).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Union

SPLITS = ('train', 'valid', 'test')


@dataclasses.dataclass(frozen=True)
class Example:
  name: str
  split: str
  labels: dict          # pitch:int, velocity:int, family:str, instrument:str
  load: Union[str, Callable[[], Any]]   # path, or () -> (wave, sample_rate)
  key: str = ''         # identifies the content (path / generator args) for shard reuse


def hash_fraction(name: str) -> float:
  """A stable pseudo-random number in [0, 1) from a name (same on every machine)."""
  h = hashlib.sha1(name.encode()).digest()
  return int.from_bytes(h[:8], 'little') / 2.0 ** 64


def _cap(examples, max_files):
  """Keeps a deterministic, label-unbiased subset of at most max_files (0 = all)."""
  if not max_files or len(examples) <= max_files:
    return examples
  keep = sorted(examples, key=lambda e: hash_fraction('cap/' + e.name))[:max_files]
  return sorted(keep, key=lambda e: e.name)


class Source:
  """Lists examples per split; subclasses fill `_list(split) -> (examples, skipped, filtered)`."""

  name = ''

  def __init__(self, config):
    self.config = config
    self._cache = {}

  def _listing(self, split):
    if split not in SPLITS:
      raise ValueError(f'unknown split {split!r}; use one of {SPLITS}')
    if split not in self._cache:
      examples, skipped, filtered = self._list(split)
      examples = sorted(examples, key=lambda e: e.name)
      self._cache[split] = (_cap(examples, int(self.config.data.max_files)), skipped, filtered)
    return self._cache[split]

  def examples(self, split) -> list:
    """The examples of `split`, sorted by name (deterministic)."""
    return self._listing(split)[0]

  def skipped(self, split) -> list:
    """[{'file', 'split', 'reason'}] dropped while listing (e.g. missing labels)."""
    return self._listing(split)[1]

  def filtered(self, split) -> int:
    """How many notes the data.* filters removed (not an error, so not in `skipped`)."""
    return self._listing(split)[2]

  def _list(self, split):
    raise NotImplementedError
