"""glibc's malloc under XLA's CPU runtime: transparent huge pages, set once when a process starts.

XLA's CPU runtime allocates every step's temporaries afresh (hundreds of MiB for the VAR step).
glibc serves allocations that large with mmap and unmaps them on free, so each step touches new
memory and takes a page fault per 4 KiB: the tiny VAR step took 60,000 faults and 0.20 s of
kernel time in a 0.43 s step (BENCHMARKS.md "Page faults"). glibc >= 2.35 can back its mappings
with transparent huge pages (the tunable `glibc.malloc.hugetlb=1`): 2 MiB a fault, ~370 a step,
and the same step takes 0.31 s with results bit for bit the same.

glibc reads tunables only when a process starts, so the CLI and the benchmarks re-execute
themselves once with GLIBC_TUNABLES extended (`reexec_with_huge_pages`). Nothing happens when
the setting cannot help or was chosen already: not glibc or glibc < 2.35; the kernel's THP mode
is not `madvise` (`always` gives huge pages anyway, `never` none at all); GLIBC_TUNABLES
already names glibc.malloc.hugetlb (set it to 0 to opt out); or LD_PRELOAD brings another
malloc (tcmalloc, jemalloc, mimalloc).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
OTHER_MALLOCS = ('tcmalloc', 'jemalloc', 'mimalloc')


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != 'glibc':
    return None
  try:
    return tuple(int(p) for p in version.split('.')[:2])
  except ValueError:
    return None


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def huge_page_env(environ: Mapping[str, str], libc: Optional[tuple],
                  thp: Optional[str]) -> Optional[dict]:
  """The environment to restart with, or None when the process should run as it is."""
  if libc is None or libc < (2, 35) or thp != 'madvise':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if any(t.split('=', 1)[0] == TUNABLE for t in tunables.split(':')):
    return None
  if any(m in environ.get('LD_PRELOAD', '') for m in OTHER_MALLOCS):
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  return env


def reexec_with_huge_pages() -> None:
  """Restarts this process (same pid, same command line) with glibc's huge-page malloc when
  `huge_page_env` says so; returns otherwise. Call it first thing in a `__main__`."""
  env = huge_page_env(os.environ, glibc_version(), thp_mode())
  if env is None or not sys.executable:   # an embedded interpreter has nothing to re-execute
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
