"""configs/small.py: the mission's 16 kHz, 4 s, 512 x 512 front end on a CPU budget (issue 11)."""
import json
import os
import subprocess
import sys

import pytest
import soundfile as sf

from mars_jax import config as config_lib
from tests.helpers import TIMGM6MB, load_config, needs_soundfont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# small.py cut down to 2-3 notes a split (one pitch, three families) and a few steps a stage; the
# front end's shapes stay small.py's (512 x 512 spectrogram, 32 x 32 x 256 image, 16 x 16 latent).
CUT_DOWN = {
    'data.path': TIMGM6MB,
    'data.pitch_range': '(60, 60)',
    'data.soundfont.families': "('guitar', 'organ', 'vocal')",
    'data.prepare_workers': 1,
    'spectrogram.griffin_lim_iters': 4,
    'sample.num': 2, 'sample.batch_size': 2,
    'evaluate.ceiling_notes': 2, 'evaluate.ndb_bins': 2, 'evaluate.report_grid': 2,
}
for _stage in ('tokenizer', 'autoregressor', 'classifier'):
  CUT_DOWN.update({f'{_stage}.train.{k}': v for k, v in (
      ('steps', 2), ('batch_size', 2), ('log_every', 1),
      ('checkpoints_per_run', 1), ('evals_per_run', 1))})   # eval and save once: fewer compiles

# Compiling the 512 x 512 programs is nearly all of this test's time: one device (not the
# suite's 8 simulated ones) and XLA's cheapest CPU code generation take it from ~140 s to ~75 s;
# without XNNPACK's dot fusions the tokenizer's step compiles in 8 s instead of 11 s (they are
# checked to compute the same step in tests/test_xla_options.py). The huge-page tunable set here
# spares main.py its restart (mars_jax/allocator.py). None of it changes what is computed.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
FAST_COMPILE_CONFIG = {f'{stage}.train.xla_cpu_options': ''
                       for stage in ('tokenizer', 'classifier')}
ENV = {'XLA_FLAGS': FAST_COMPILE, 'JAX_PLATFORMS': 'cpu',
       'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
OVERRIDES = {**CUT_DOWN, **FAST_COMPILE_CONFIG}


def test_the_cut_down_overrides_name_fields_of_small():
  """A renamed config field fails here in the fast loop, not after minutes in the slow test."""
  c = load_config('small')
  for key in OVERRIDES:
    node = c
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    assert last in node, f'{key} is not a field of configs/small.py'


@needs_soundfont
@pytest.mark.slow
def test_a_short_small_run_goes_through_every_stage(tmp_path):
  wd = str(tmp_path / 'small')
  env = dict(os.environ, **ENV)
  args = [sys.executable, '-m', 'mars_jax.main', '--config=configs/small.py', f'--workdir={wd}']
  args += [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  for stage in ('prepare', 'tokenizer', 'autoregressor', 'sample', 'evaluate'):
    assert f'[{stage}] done in' in run.stdout + run.stderr, stage
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
