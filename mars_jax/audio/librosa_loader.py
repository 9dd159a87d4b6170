"""librosa, first imported by one process of a machine at a time (numba's gufunc cache race).

librosa compiles its numba gufuncs (pyin's parabolic interpolation, local maxima, zero
crossings) when their modules are imported, and caches the machine code on disk (cache=True).
When two processes compile the same gufunc at once, the cache can keep the function's two files
from different processes, and every later process that loads them dies with a segmentation fault
inside the gufunc (numba/numba#10128, open as of numba 0.68; librosa/librosa#1998). That is the
first run after an install with several processes: pytest's workers, a multi-process launch on
one host. `load` imports those modules under an exclusive lock on a file in the temp directory,
so one process compiles and writes the cache while the others wait, then only read it.
"""
import fcntl
import functools
import importlib
import os
import tempfile
import warnings

# librosa's modules whose import compiles cache=True gufuncs (librosa 0.10-0.11); the beat
# tracker's gufuncs are not cached, and we never use it.
COMPILED_MODULES = ('librosa.util.utils', 'librosa.core.audio', 'librosa.core.pitch')


def lock_path() -> str:
  """The lock file: one per user (another user's file would not open for writing)."""
  return os.path.join(tempfile.gettempdir(), f'mars_jax-librosa-numba-{os.getuid()}.lock')


@functools.cache
def load():
  """The librosa module, its compiled modules imported under the machine-wide lock (without
  it, with a warning, where the temp directory takes no file)."""
  try:
    f = open(lock_path(), 'a')
  except OSError as e:
    warnings.warn(f'librosa imported without its lock ({e}); processes starting together on a '
                  'fresh install may corrupt numba\'s cache (set TMPDIR to a writable folder)')
    return importlib.import_module('librosa')
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)          # released when the file closes, even on error
    for name in COMPILED_MODULES:
      importlib.import_module(name)
  return importlib.import_module('librosa')
