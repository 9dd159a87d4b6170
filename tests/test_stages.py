"""The pipeline stages on the cut-down tiny config: they learn, skip when done, keep contracts."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from mars_jax import main
from mars_jax.models import sampling
from mars_jax.models.tokenizer import Tokenizer
from mars_jax.sample import Generator
from mars_jax.stages import sample as sample_stage
from mars_jax.stages import tokenizer as tok_stage
from tests.helpers import read_tensorboard_scalars


def _metrics(workdir, stage):
  with open(os.path.join(workdir, stage, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_tokenizer_learns(trained_workdir):
  workdir, config = trained_workdir
  rows = _metrics(workdir, 'tokenizer')
  assert rows[-1]['loss'] < 0.6 * rows[0]['loss']
  evals = [r['eval/mse'] for r in rows if 'eval/mse' in r]
  assert len(evals) == 3 and evals[-1] < evals[0]
  assert all(f'usage_{k}' in rows[-1] for k in range(len(config.tokenizer.scales)))
  # The round trip's pitch (pyin on fixed held-out notes) is logged at each eval, beside the
  # Griffin-Lim ceiling of the same notes, which does not move while the tokenizer trains.
  pitch = [r for r in rows if 'recon_pitch_within_semitone' in r]
  assert len(pitch) == 3 and all(0 <= r['recon_pitch_exact'] <= r['recon_pitch_within_semitone']
                                 <= 1 for r in pitch)
  assert {r['gl_pitch_within_semitone'] for r in pitch} == {pitch[0]['gl_pitch_within_semitone']}
  assert pitch[0]['gl_pitch_within_semitone'] >= 0.8    # clean notes survive Griffin-Lim
  # Images and audio of each eval: original and reconstruction side by side.
  last = os.path.join(workdir, 'tokenizer', 'eval', 'step_0000030')
  assert {'0_original.png', '0_reconstructed.png', '0_reconstructed.wav'} <= set(os.listdir(last))
  # TensorBoard's copy of the curves, written to the bucket (whole-object uploads), reads back.
  tb = read_tensorboard_scalars(os.path.join(workdir, 'tokenizer', 'tensorboard'))
  assert [s for s, _ in tb['loss']] == [r['step'] for r in rows if 'loss' in r]
  assert [s for s, _ in tb['eval/mse']] == [r['step'] for r in rows if 'eval/mse' in r]


def test_autoregressor_learns(trained_workdir):
  workdir, config = trained_workdir
  rows = _metrics(workdir, 'autoregressor')
  log_v = math.log(config.tokenizer.codebook_size)
  assert rows[0]['loss'] < log_v + 0.5                 # first 5 steps: near uniform (or below)
  assert rows[-1]['loss'] < 0.8 * log_v                # and learns
  chance = 1.0 / config.tokenizer.codebook_size
  # Scales 2..K (scale 1 is a single token an example, too few to judge in 30 steps).
  for k in range(1, len(config.tokenizer.scales)):
    assert rows[-1][f'acc_{k}'] > 10 * chance and rows[-1][f'eval/acc_{k}'] > 10 * chance


def test_completed_stages_are_skipped(trained_workdir, capsys):
  workdir, config = trained_workdir
  main.run(config, workdir, stages=('prepare', 'tokenizer', 'autoregressor', 'sample'))
  out = capsys.readouterr().out
  for stage in ('prepare', 'tokenizer', 'autoregressor', 'sample'):
    assert f'[{stage}] complete and matching the config: skipped' in out
  changed = config.copy_and_resolve_references()
  changed.sample.cfg = 0.5
  assert not sample_stage.is_complete(changed, workdir)
  assert tok_stage.is_complete(changed, workdir)


def test_samples_contract(trained_workdir):
  workdir, config = trained_workdir
  with open(os.path.join(workdir, 'samples', 'samples.json')) as f:
    entries = json.load(f)
  assert len(entries) == config.sample.num
  lo, hi = config.data.pitch_range
  for e in entries:
    assert {'file', 'pitch', 'instrument', 'seed', 'cfg', 'top_k', 'top_p'} <= set(e)
    assert lo <= e['pitch'] <= hi and e['instrument'] in config.data.synthetic.families
    info = sf.info(os.path.join(workdir, 'samples', e['file']))
    assert info.samplerate == config.spectrogram.sample_rate and info.subtype == 'PCM_16'
    assert info.frames == round(config.spectrogram.sample_rate * config.spectrogram.duration)
  assert len({e['seed'] for e in entries}) == len(entries)
  assert len({e['pitch'] for e in entries}) > 4     # the grid walk spreads requests


@pytest.fixture(scope='module')
def generator(trained_workdir):
  workdir, config = trained_workdir
  return Generator.from_workdir(workdir)


def test_generator_seeds_and_errors(generator):
  a = generator.generate(pitch=60, instrument='flute', n=2, seed=3)
  b = generator.generate(pitch=60, instrument='flute', n=2, seed=3)
  assert a.shape == (2, generator.shapes.n_samples) and np.array_equal(a, b)
  assert not np.allclose(a[0], a[1])                  # seeds 3 and 4 differ
  with pytest.raises(ValueError, match='outside the trained range 48..71'):
    generator.generate(pitch=30)
  with pytest.raises(ValueError, match='brass, flute, guitar, organ'):
    generator.generate(pitch=60, instrument='kazoo')


def test_kv_cache_matches_full_forward_with_the_real_tokenizer(generator):
  g = generator
  def step(k, f_hat, tok):
    return g.tokenizer.apply({'params': g.tokenizer_params}, k, f_hat, tok,
                             method=Tokenizer.next_input)
  args = (g.var_params, jnp.array([0, 5, 11]), jnp.array([0, 1, 3]), jnp.array([1, 2, 3]),
          jax.random.PRNGKey(7))
  kw = dict(next_input_fn=step, latent_shape=g.shapes.latent, cfg=2.0, top_k=50, top_p=0.9)
  cached, _ = jax.jit(lambda *a: sampling.sample_tokens(g.var, *a, **kw))(*args)
  full, _ = jax.jit(lambda *a: sampling.sample_tokens_nocache(g.var, *a, **kw))(*args)
  for c, f in zip(cached, full):
    np.testing.assert_array_equal(np.asarray(c), np.asarray(f))
