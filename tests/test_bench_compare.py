"""bench/compare.py: two versions' train steps, each in its own process with its own code."""
import os
import subprocess

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
