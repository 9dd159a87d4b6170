"""configs/small.py: the mission's 16 kHz, 4 s, 512 x 512 front end on a CPU budget (issue 11)."""
import json
import os

import pytest
import soundfile as sf

from mars_jax import config as config_lib
from tests.helpers import TIMGM6MB, load_config, needs_soundfont

FRONT_END = ('sample_rate', 'duration', 'n_fft', 'hop', 'log_eps', 'log_max',
             'griffin_lim_iters', 'griffin_lim_momentum')


def test_small_is_the_missions_spectrogram_with_base_front_end():
  small, base = load_config('small'), load_config('base')
  s = config_lib.derive(small)
  assert s.n_samples == 64000 and s.spectrogram == (512, 512)
  assert s.image == (32, 32, 256)          # CMX r=16: every 16 x 16 block is one pixel
  assert s.latent == (16, 16, small.tokenizer.latent_channels)
  assert s.latent[:2] == config_lib.derive(base).latent[:2]   # base's token-map side
  assert s.scales == (1, 2, 4, 8, 16) and s.num_tokens == 341
  for field in FRONT_END:
    assert small.spectrogram[field] == base.spectrogram[field], field
  assert small.data.source == 'soundfont'


def cut_down_small():
  """small.py on 2-3 notes a split (one pitch, three families) and a few steps a stage."""
  c = load_config('small')
  c.data.path = TIMGM6MB
  c.data.pitch_range = (60, 60)
  c.data.soundfont.families = ('guitar', 'organ', 'vocal')
  c.data.prepare_workers = 1
  for stage in ('tokenizer', 'autoregressor', 'classifier'):
    t = c[stage].train
    t.steps, t.batch_size, t.log_every = 2, 8, 1   # 8: one row per simulated device
    t.checkpoints_per_run = t.evals_per_run = 1    # once, at the last step: fewer compiles
  c.spectrogram.griffin_lim_iters = 4              # the front end's shapes stay small.py's
  c.sample.num, c.sample.batch_size = 2, 2
  c.evaluate.ceiling_notes = 2
  c.evaluate.ndb_bins = 2
  c.evaluate.report_grid = 2
  return c


@needs_soundfont
@pytest.mark.slow
def test_a_short_small_run_goes_through_every_stage(tmp_path):
  from mars_jax import main
  c = cut_down_small()
  wd = str(tmp_path / 'small')
  main.run(c, wd)
  manifest = json.load(open(os.path.join(wd, 'data', 'manifest.json')))
  counts = {k: v['count'] for k, v in manifest['splits'].items()}
  assert 2 <= counts['valid'] <= 3 and 2 <= counts['test'] <= 3, counts
  samples = json.load(open(os.path.join(wd, 'samples', 'samples.json')))
  assert len(samples) == 2
  for e in samples:
    info = sf.info(os.path.join(wd, 'samples', e['file']))
    assert (info.samplerate, info.frames) == (16000, 64000)      # 4 s at 16 kHz
  m = json.load(open(os.path.join(wd, 'eval', 'metrics.json')))
  assert m['num_generated'] == 2 and m['num_ceiling'] == min(counts['test'], 2)
  assert 0 <= m['recon_mse'] < 4.0           # finite, on the [-1, 1] scale
  assert os.path.exists(os.path.join(wd, 'report.html'))
