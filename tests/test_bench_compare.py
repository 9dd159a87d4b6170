"""bench/compare.py: two versions' train steps, each in its own process with its own code."""
import argparse
import os
import subprocess
import sys

import pytest

from mars_jax.bench import compare


def test_extract_writes_the_commits_files(tmp_path):
  head = subprocess.run(['git', '-C', compare.repo_root(), 'rev-parse', 'HEAD'],
                        capture_output=True, text=True)
  if head.returncode != 0:
    pytest.skip('not a git checkout')
  tree = compare.extract('HEAD', str(tmp_path))
  committed = subprocess.run(['git', '-C', compare.repo_root(), 'show', 'HEAD:setup.cfg'],
                             capture_output=True, text=True, check=True).stdout
  assert open(os.path.join(tree, 'setup.cfg')).read() == committed


def test_an_unknown_commit_is_refused_with_its_name(tmp_path):
  with pytest.raises(SystemExit, match='--against no-such-rev'):
    compare.extract('no-such-rev', str(tmp_path))


def test_the_speedup_interval_is_the_geometric_mean_of_rounds_plus_minus_two_se():
  # log ratios log 2 and log 4: mean 1.5 log 2, SE = (log 2 / sqrt 2) / sqrt 2 = log 2 / 2.
  mean, lo, hi = compare.speedup_interval([2.0, 4.0], [1.0, 1.0])
  assert mean == pytest.approx(2 ** 1.5)
  assert lo == pytest.approx(2 ** 0.5) and hi == pytest.approx(2 ** 2.5)
  assert compare.speedup_interval([3.0], [2.0]) == pytest.approx((1.5, 1.5, 1.5))
  with pytest.raises(ValueError):
    compare.speedup_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize('lo,hi,expected', [(1.5, 1.7, 'met'), (1.2, 1.39, 'not met'),
                                            (1.3, 1.5, 'not resolved'), (1.4, 1.4, 'met')])
def test_a_target_is_met_only_when_the_whole_interval_clears_it(lo, hi, expected):
  assert compare.verdict(1.4, lo, hi) == expected


@pytest.mark.parametrize('flag', ['--rounds=0', '--steps=0', '--warmup=-1'])
def test_counts_below_their_minimum_are_refused_by_name(flag, capsys):
  with pytest.raises(SystemExit):
    compare.main([flag])
  assert flag.split('=')[0] in capsys.readouterr().err


@pytest.mark.slow
def test_the_same_commit_on_both_sides_computes_the_same_loss(capsys):
  """HEAD against HEAD: each side's child imports its own tree (checked by run_child) and both
  compute the identical loss after the same steps on the same random batch."""
  if subprocess.run(['git', '-C', compare.repo_root(), 'rev-parse', 'HEAD'],
                    capture_output=True).returncode != 0:
    pytest.skip('not a git checkout')
  assert compare.main(['--against', 'HEAD', '--parts', 'tok_tiny', '--rounds', '1',
                       '--steps', '1', '--warmup', '1', '--json']) == 0
  import json
  row = json.loads(capsys.readouterr().out)['rows'][0]
  assert row['earlier_loss'] == row['this_loss']
  assert row['earlier_s'] > 0 and row['this_s'] > 0
  assert row['target'] is None and row['verdict'] is None   # tok_tiny has no issue target


FAKE_SERVER = r'''
import json, os, sys
side, seconds, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
print('some JAX warning on stdout', flush=True)
print('READY', flush=True)
times = []
for line in sys.stdin:
  words = line.split()
  if words[0] != 'run':
    break
  with open(log, 'a') as f:
    f.write(f'{side} {words[1]}\n')
  times += [seconds] * int(words[1])
  print('TIMES ' + json.dumps([seconds] * int(words[1])), flush=True)
print('RESULT ' + json.dumps({'part': 'p', 'compile_s': 0.0, 'times': times, 'loss': 1.0,
                              'minor_faults': 0, 'kernel_s': 0.0,
                              'code': os.path.join(os.getcwd(), 'mars_jax')}), flush=True)
'''


def _fake_sides(tmp_path, monkeypatch, script=FAKE_SERVER):
  """Two fake children speaking the server protocol: 'earlier' steps in 2 s, 'this' in 1 s."""
  server = tmp_path / 'server.py'
  server.write_text(script)
  log = tmp_path / 'log'
  seconds = {'earlier': 2.0, 'this': 1.0}

  def cmd(tree, part, args, sets, extra_env, serve):
    side = os.path.basename(tree)
    return [sys.executable, str(server), side, str(seconds[side]), str(log)], dict(os.environ)

  monkeypatch.setattr(compare, '_child_cmd', cmd)
  sides = []
  for side in seconds:
    (tmp_path / side).mkdir()
    sides.append((side, str(tmp_path / side), [], {}))
  return tuple(sides), log


def test_interleaved_sides_take_turns_a_round_at_a_time_in_swapped_order(tmp_path, monkeypatch):
  sides, log = _fake_sides(tmp_path, monkeypatch)
  args = argparse.Namespace(rounds=3, steps=4, warmup=0)
  runs, _, loss = compare.measure_interleaved(sides, 'p', args)
  assert log.read_text().split('\n')[:-1] == ['earlier 4', 'this 4', 'this 4', 'earlier 4',
                                               'earlier 4', 'this 4']
  assert runs == {'earlier': [2.0] * 3, 'this': [1.0] * 3}
  assert compare.speedup_interval(runs['earlier'], runs['this']) == (2.0, 2.0, 2.0)
  assert loss == {'earlier': 1.0, 'this': 1.0}


def test_a_child_that_dies_is_reported_with_its_error(tmp_path, monkeypatch):
  dying = "import sys\nprint('READY', flush=True)\nsys.exit('out of memory in the step')\n"
  sides, _ = _fake_sides(tmp_path, monkeypatch, dying)
  with pytest.raises(SystemExit, match='out of memory in the step'):
    compare.run_interleaved(sides, 'p', argparse.Namespace(rounds=1, steps=1, warmup=0))
