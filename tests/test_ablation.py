"""bench ablation's pieces (issue 11): the arms' configs, the shared data, the step times read."""
import json
import os

import pytest

from mars_jax import config as config_lib
from mars_jax.bench import ablation
from tests.helpers import ROOT

SMALL = str(ROOT / 'configs' / 'small.py')


def test_arms_differ_only_in_how_the_spectrogram_becomes_an_image():
  sets = ['tokenizer.train.steps=7', 'autoregressor.train.lr=0.002', 'data.pitch_range=(50, 60)']
  arms = {m: ablation.load_config(SMALL, m, sets) for m in ('cmx', 'truncate', 'none')}
  shapes = {m: config_lib.derive(c) for m, c in arms.items()}
  assert shapes['cmx'].image == (32, 32, 256)
  assert shapes['truncate'].image == (32, 32, 1)         # the lowest 512/16 bins, first frames
  assert shapes['none'].image == (512, 512, 1)
  # Five extra halvings in front of small's (1, 2): the same 16 x 16 latent and token maps.
  assert tuple(arms['none'].tokenizer.channel_mult) == (1, 1, 1, 1, 1, 2)
  assert {s.latent for s in shapes.values()} == {shapes['cmx'].latent}
  assert {s.num_tokens for s in shapes.values()} == {341}
  for c in arms.values():
    assert c.tokenizer.train.steps == 7 and isinstance(c.tokenizer.train.steps, int)
    assert c.autoregressor.train.lr == 0.002
    assert tuple(c.data.pitch_range) == (50, 60)
  assert ablation.overrides('truncate', sets) == [
      '--config.cmx.mode=truncate', '--config.tokenizer.train.steps=7',
      '--config.autoregressor.train.lr=0.002', '--config.data.pitch_range=(50, 60)']


def test_none_arm_needs_a_power_of_two_factor():
  c = ablation.load_config(SMALL, 'cmx', [])
  c.cmx.factor = 12
  with pytest.raises(SystemExit, match='power of two'):
    ablation.none_channel_mult(c)


def test_data_is_shared_by_hard_links(tmp_path):
  src = tmp_path / 'cmx' / 'data'
  (src / 'sub').mkdir(parents=True)
  (src / 'manifest.json').write_text('{}')
  (src / 'sub' / 'train-00000.array_record').write_bytes(b'x' * 10)
  dst = tmp_path / 'truncate' / 'data'
  ablation.link_tree(str(src), str(dst))
  for rel in ('manifest.json', 'sub/train-00000.array_record'):
    assert os.path.samefile(src / rel, dst / rel)


def test_train_step_seconds_is_the_median_of_the_logged_rates(tmp_path):
  (tmp_path / 'tokenizer').mkdir()
  rows = [{'step': 10, 'loss': 1.0, 'steps_per_sec': 2.0},
          {'step': 20, 'loss': 1.0, 'steps_per_sec': 4.0},
          {'step': 20, 'eval/loss': 1.0},                       # eval rows carry no rate
          {'step': 30, 'loss': 1.0, 'steps_per_sec': 1.0}]
  with open(tmp_path / 'tokenizer' / 'metrics.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows))
  assert ablation.train_step_seconds(str(tmp_path), 'tokenizer') == pytest.approx(0.5)
