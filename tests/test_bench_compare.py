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
