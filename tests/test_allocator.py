"""mars_jax.allocator: when the CLI restarts with glibc's huge-page malloc, and that it does."""
import os
import subprocess
import sys

from mars_jax import allocator
from tests.helpers import ROOT

ON = 'glibc.malloc.hugetlb=1'


def test_restarts_only_where_huge_pages_help_and_nobody_chose_otherwise():
  env = allocator.huge_page_env
  assert env({}, (2, 36), 'madvise') == {'GLIBC_TUNABLES': ON}
  # The user's other tunables are kept, ours appended.
  assert env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': '1'}, (2, 35), 'madvise') == {
      'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:' + ON, 'X': '1'}
  assert env({}, (2, 34), 'madvise') is None          # glibc without the tunable
  assert env({}, None, 'madvise') is None             # not glibc (musl, macOS)
  assert env({}, (2, 36), 'always') is None           # huge pages already
  assert env({}, (2, 36), 'never') is None            # none to be had
  assert env({}, (2, 36), None) is None               # no THP at all
  assert env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, (2, 36), 'madvise') is None  # opt-out
  assert env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb_x=1'}, (2, 36), 'madvise') == {
      'GLIBC_TUNABLES': 'glibc.malloc.hugetlb_x=1:' + ON}     # a name is matched whole
  assert env({'LD_PRELOAD': '/usr/lib/libtcmalloc_minimal.so.4'}, (2, 36), 'madvise') is None


def test_reads_the_kernels_mode_and_the_libc_version(tmp_path):
  f = tmp_path / 'enabled'
  f.write_text('always [madvise] never\n')
  assert allocator.thp_mode(str(f)) == 'madvise'
  f.write_text('[always] madvise never\n')
  assert allocator.thp_mode(str(f)) == 'always'
  assert allocator.thp_mode(str(tmp_path / 'missing')) is None
  v = allocator.glibc_version()
  assert v is None or (len(v) == 2 and v >= (2, 0))


def test_a_main_restarts_once_with_the_same_command_line_and_the_computed_environment():
  """The child prints what it sees after `reexec_with_huge_pages`: on a machine where the
  setting helps it restarted once (same argv, GLIBC_TUNABLES extended); elsewhere it did not."""
  code = ('import os, sys; from mars_jax import allocator; print("start", flush=True); '
          'allocator.reexec_with_huge_pages(); '
          'print(os.environ.get("GLIBC_TUNABLES", "")); print(sys.argv[1:])')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
  env['PYTHONPATH'] = str(ROOT)
  run = subprocess.run([sys.executable, '-c', code, 'a', '--b=c'], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
  expected = allocator.huge_page_env(env, allocator.glibc_version(), allocator.thp_mode())
  lines = run.stdout.splitlines()
  assert lines[-1] == "['a', '--b=c']"
  if expected is None:
    assert lines == ['start', '', "['a', '--b=c']"]
  else:
    assert lines == ['start', 'start', expected['GLIBC_TUNABLES'], "['a', '--b=c']"]
