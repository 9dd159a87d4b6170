"""metrics_log: metrics.jsonl and TensorBoard events (tensorboardX) on a disk and in a bucket."""
import json
import math

from mars_jax.train import metrics_log
from tests import fake_gcs
from tests.helpers import read_tensorboard_scalars


def _log_three_steps(stage_dir):
  log = metrics_log.MetricsLogger(stage_dir)
  for step in (1, 2, 3):
    log.write(step, {'loss': 1.0 / step, 'eval/mse': 0.5 * step, 'lr': 1e-3,
                     'bad': math.nan, 'note': 'text'})
  return log


def test_scalars_are_readable_from_a_local_folder(tmp_path):
  log = _log_three_steps(str(tmp_path))
  log.flush()
  got = read_tensorboard_scalars(tmp_path / 'tensorboard')
  assert sorted(got) == ['eval/mse', 'loss', 'lr']          # NaN and strings are not scalars
  assert [s for s, _ in got['loss']] == [1, 2, 3]
  assert [round(v, 6) for _, v in got['loss']] == [1.0, 0.5, round(1 / 3, 6)]
  assert [v for _, v in got['eval/mse']] == [0.5, 1.0, 1.5]
  log.close()
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3] and rows[0]['bad'] == 'nan'


def test_scalars_reach_a_bucket_at_flush(tmp_path, monkeypatch):
  """A bucket has no append: the events object is re-uploaded whole (at most every 30 s, and
  at once on flush), through mars_jax.fs rather than tensorboardX's own GCS client."""
  fake_gcs.use(tmp_path, monkeypatch)
  log = _log_three_steps('gs://b/run/tokenizer')
  local = tmp_path / 'b' / 'run' / 'tokenizer' / 'tensorboard'
  first = read_tensorboard_scalars(local)           # the first upload happens at once
  assert [s for s, _ in first['loss']] == [1]
  log.write(4, {'loss': 0.25})
  log.flush()
  assert [s for s, _ in read_tensorboard_scalars(local)['loss']] == [1, 2, 3, 4]
  log.write(5, {'loss': 0.125})
  log.close()
  assert read_tensorboard_scalars(local)['loss'][-1] == (5, 0.125)
