"""`python -m mars_jax.bench sweep`: its grid, its two-standard-error rule, and a run on a
trained workdir (reproducible: the same setting twice scores the same)."""
import os
import shutil

import pytest

from mars_jax.bench import sweep


def test_grid_and_the_two_error_rule():
  assert sweep.grid([0, 3], [0, 64], [0.9]) == [(0.0, 0, 0.9), (0.0, 64, 0.9), (3.0, 0, 0.9),
                                                 (3.0, 64, 0.9)]
  rows = [{'pitch_within_semitone': p, 'pitch_within_semitone_se': se}
          for p, se in ((0.80, 0.04), (0.70, 0.04), (0.65, 0.05), (0.50, 0.05))]
  marks = [r['near_best'] for r in sweep.within_two_errors(rows)]
  # 0.10 <= 2 * hypot(0.04, 0.04) = 0.113; 0.15 > 2 * hypot(0.05, 0.04) = 0.128.
  assert marks == [True, True, False, False]


@pytest.mark.slow
def test_sweep_on_a_trained_workdir(trained_workdir, tmp_path):
  from mars_jax.stages import evaluate
  src, config = trained_workdir
  wd = str(tmp_path / 'wd')
  shutil.copytree(src, wd)
  evaluate.run(config, wd, log=lambda *a: None)   # trains the classifiers the sweep scores with
  settings = [(0.0, 0, 0.0), (0.0, 0, 0.0), (2.0, 8, 0.9)]
  rows = sweep.run(wd, settings, num=6, log=lambda *a: None)
  assert [(r['cfg'], r['top_k'], r['top_p']) for r in rows] == settings
  assert all(r['n'] == 6 and 0 <= r['pitch_within_semitone'] <= 1 for r in rows)
  for k in ('pitch_exact', 'pitch_within_semitone', 'clf_pitch_match', 'pkid', 'ndb_k'):
    assert rows[0][k] == rows[1][k], k            # same requests, seeds and setting
  assert any(r['near_best'] for r in rows)
  assert os.path.exists(os.path.join(wd, 'eval', 'metrics.json'))
