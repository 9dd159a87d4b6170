"""Schedules follow the steps you set (issue 15); weight decay is chosen by parameter name.

No training here: the schedule is the optax function the engine builds (engine.make_optimizer),
evaluated at the steps the engine runs; the cadences are the engine's `done % every == 0 or last`.
"""
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from mars_jax import config as config_lib
from mars_jax.train import engine
from mars_jax.train.partitioning import unbox
from tests.helpers import ROOT, load_config

STAGES = ('tokenizer', 'autoregressor', 'classifier')


def _cli_config(*overrides, name='tiny'):
  """The config exactly as `python -m mars_jax.main --config=configs/<name>.py <overrides>` gets
  it."""
  argv = ['prog', f'--config={ROOT / "configs" / f"{name}.py"}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _saved_at(steps, every):
  """The steps after which the engine checkpoints (or evaluates) with this cadence."""
  return [d for d in range(1, steps + 1) if d % every == 0 or d == steps]


def _check_stage(tc):
  """The documented rule (defaults._train) holds for one stage's resolved training settings."""
  steps = tc.steps
  assert tc.warmup_steps == round(steps * tc.warmup_fraction)
  assert tc.checkpoint_every == -(-steps // tc.checkpoints_per_run)
  assert tc.eval_every == -(-steps // tc.evals_per_run)
  _, schedule = engine.make_optimizer(tc, engine.Task(init=None, loss=None))
  lr = lambda i: float(schedule(i))
  end = tc.lr * tc.end_lr_fraction
  w = tc.warmup_steps
  assert lr(0) == 0.0 if w > 0 else lr(0) == pytest.approx(tc.lr, rel=1e-6)
  assert lr(w) == pytest.approx(tc.lr, rel=1e-6)                 # peak at the end of the warm-up
  if w > 1:
    assert lr(w // 2) < tc.lr
  assert lr(steps - 1) == pytest.approx(end, rel=1e-5)            # the last update uses the end
  if steps - 1 - w >= 2:                                          # ... reached by a cosine
    assert lr((w + steps - 1) // 2) == pytest.approx((tc.lr + end) / 2, rel=0.05)
  # At least one checkpoint and one eval happen before the end.
  assert _saved_at(steps, tc.checkpoint_every)[0] < steps
  assert _saved_at(steps, tc.eval_every)[0] < steps


@pytest.mark.parametrize('name', ['tiny', 'base', 'large'])
def test_shipped_configs_schedule_follows_steps(name):
  c = load_config(name)
  config_lib.derive(c)
  for stage in STAGES:
    tc = c[stage].train
    assert tc.warmup_fraction == 0.05 and tc.end_lr_fraction == 0.1
    _check_stage(tc)
    # The runs train past their warm-up: most of the run is at or after the peak.
    assert tc.warmup_steps <= 0.05 * tc.steps + 0.5


def test_tiny_cadence_follows_its_counts():
  """tiny states counts, not intervals: 3 saves and evals over its 1800 tokenizer steps, 4 over
  the autoregressor's 400, 2 over the classifiers' 150; warm-ups are 5% of the steps."""
  c = load_config('tiny')
  assert c.tokenizer.train.steps == 1800
  assert (c.tokenizer.train.checkpoint_every, c.tokenizer.train.eval_every) == (600, 600)
  assert (c.autoregressor.train.checkpoint_every, c.autoregressor.train.eval_every) == (100, 100)
  assert (c.classifier.train.checkpoint_every, c.classifier.train.eval_every) == (75, 75)
  assert c.tokenizer.train.warmup_steps == 90 and c.autoregressor.train.warmup_steps == 20


@pytest.mark.parametrize('steps', [2, 7, 57, 1000, 250_000])
def test_steps_override_on_the_command_line_moves_what_derives_from_it(steps):
  c = _cli_config(f'--config.tokenizer.train.steps={steps}')
  tc = c.tokenizer.train
  assert tc.steps == steps
  config_lib.derive(c)
  _check_stage(tc)
  assert c.autoregressor.train.steps == 400          # the other stages are untouched


@pytest.mark.parametrize('name', ['base', 'large'])
def test_steps_override_on_base_and_large(name):
  c = _cli_config('--config.tokenizer.train.steps=1000', '--config.autoregressor.train.steps=600',
                  '--config.classifier.train.steps=90', name=name)
  config_lib.derive(c)
  for stage in STAGES:
    _check_stage(c[stage].train)
  assert c.tokenizer.train.warmup_steps == 50 and c.tokenizer.train.checkpoint_every == 250


def test_fraction_and_count_overrides_move_the_derived_values():
  c = _cli_config('--config.autoregressor.train.warmup_fraction=0.1',
                  '--config.autoregressor.train.evals_per_run=8')
  tc = c.autoregressor.train
  assert tc.warmup_steps == 40 and tc.eval_every == 50 and tc.checkpoint_every == 100
  _check_stage(tc)


def test_an_explicit_value_wins_over_the_rule():
  c = _cli_config('--config.tokenizer.train.warmup_steps=7', '--config.tokenizer.train.steps=900',
                  '--config.tokenizer.train.eval_every=450')
  tc = c.tokenizer.train
  assert (tc.warmup_steps, tc.eval_every, tc.checkpoint_every) == (7, 450, 300)
  c = load_config('tiny')                             # the same from Python, in any order
  c.tokenizer.train.checkpoint_every = 11
  c.tokenizer.train.steps = 40
  assert (c.tokenizer.train.checkpoint_every, c.tokenizer.train.warmup_steps) == (11, 2)


def test_derivation_survives_pickle_and_copies():
  c = load_config('tiny')
  for d in (pickle.loads(pickle.dumps(c)), c.copy_and_resolve_references()):
    assert d.tokenizer.train.warmup_steps == 90
  d = pickle.loads(pickle.dumps(c))
  d.tokenizer.train.steps = 1000
  assert d.tokenizer.train.warmup_steps == 50 and c.tokenizer.train.warmup_steps == 90


@pytest.mark.parametrize('field,value,needle', [
    ('warmup_steps', 1800, 'tokenizer.train.warmup_steps=1800 must be in [0, steps=1800)'),
    ('warmup_fraction', 1.0, 'tokenizer.train.warmup_fraction=1.0'),
    ('checkpoints_per_run', 0, 'tokenizer.train.checkpoints_per_run=0'),
    ('evals_per_run', 0, 'tokenizer.train.evals_per_run=0'),
    ('end_lr_fraction', 2.0, 'tokenizer.train.end_lr_fraction=2.0'),
])
def test_bad_schedule_field_is_named(field, value, needle):
  c = load_config('tiny')
  c.tokenizer.train[field] = value
  with pytest.raises(config_lib.ConfigError, match=needle.replace('[', r'\[').replace('(', r'\(')
                     .replace(')', r'\)')):
    config_lib.derive(c)


def test_config_json_records_the_numbers_used(tmp_path):
  from mars_jax import main
  c = _cli_config('--config.tokenizer.train.steps=57')
  main.run(c, str(tmp_path), stages=[])
  saved = json.loads((tmp_path / 'config.json').read_text())['tokenizer']['train']
  assert saved['steps'] == 57 and saved['warmup_steps'] == 3
  assert saved['checkpoint_every'] == 19 and saved['eval_every'] == 19   # tiny: 3 per run
  assert saved['warmup_fraction'] == 0.05 and saved['checkpoints_per_run'] == 3
  # A workdir's config.json, read back (mars_jax.workdir.load_config), matches the stages it made.
  from mars_jax import workdir
  assert (workdir.fingerprint(workdir.load_config(str(tmp_path)), 'tokenizer')
          == workdir.fingerprint(c, 'tokenizer'))


def test_schedule_line_names_warmup_peak_end_and_steps():
  tc = load_config('tiny').tokenizer.train
  line = engine.describe_schedule('tokenizer', tc)
  assert '1800 steps' in line and 'warm-up 90 steps 0 -> 0.001' in line
  assert 'cosine to 0.0001 at the last step' in line


# --- weight decay by name -------------------------------------------------------------------


def _paths(tree):
  return {'/'.join(str(k.key) for k in path): x for path, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _decayed(params):
  mask = _paths(engine.decay_mask(params))
  return {p for p, on in mask.items() if on}


def _rank_rule(params):   # the rule before issue 10: every leaf of rank >= 2
  return {p for p, x in _paths(params).items() if x.ndim >= 2}


def _tiny_tokenizer_params():
  from mars_jax.stages import tokenizer as tok_stage
  c = load_config('tiny')
  s = config_lib.derive(c)
  task, _ = tok_stage.make_task(c, s)
  image = jax.ShapeDtypeStruct((2,) + s.image, jnp.float32)
  return unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0), {'image': image}))


def _tiny_var_params():
  from mars_jax.models import autoregressor as ar
  c = load_config('tiny')
  s = config_lib.derive(c)
  model = ar.from_config(c, s, num_instruments=4)
  ids = jnp.zeros((2,), jnp.int32)
  teacher = jnp.zeros((2, s.num_tokens - s.scales[0] ** 2, s.latent[-1]))
  return unbox(jax.eval_shape(lambda r: model.init({'params': r}, ids, ids, teacher)['params'],
                              jax.random.PRNGKey(0)))


# Exactly what decays in the tiny VAR: the Dense kernels, the attention's q/k/v and output
# matrices, and the condition tables (VAR decays its class_emb). Everything else does not: the
# biases (2-D under nn.scan), the attention's learned log-scale, the start/position/level
# embeddings.
TINY_VAR_DECAYED = {
    'blocks/ada/kernel', 'blocks/attn/qkv', 'blocks/attn/proj', 'blocks/fc1/kernel',
    'blocks/fc2/kernel', 'head/kernel', 'head_ada/kernel', 'word_embed/kernel',
    'pitch_embed', 'inst_embed',
}
TINY_VAR_NOT_DECAYED = {
    'blocks/ada/bias', 'blocks/attn/log_scale', 'blocks/attn/proj_bias', 'blocks/attn/q_bias',
    'blocks/attn/v_bias', 'blocks/fc1/bias', 'blocks/fc2/bias', 'head/bias', 'head_ada/bias',
    'word_embed/bias', 'pos_start', 'pos_embed', 'level_embed',
}


def test_var_decays_exactly_its_matrices():
  params = _tiny_var_params()
  assert set(_paths(params)) == TINY_VAR_DECAYED | TINY_VAR_NOT_DECAYED   # nothing unlisted
  assert _decayed(params) == TINY_VAR_DECAYED
  assert _rank_rule(params) != TINY_VAR_DECAYED     # the rank rule decayed scanned biases, ...


def test_tokenizer_decays_exactly_its_conv_and_dense_kernels():
  params = _tiny_tokenizer_params()
  paths = _paths(params)
  kernels = {p for p in paths if p.endswith('/kernel')}
  assert _decayed(params) == kernels and len(kernels) == 52
  assert {'quantizer/phis_0/Conv_0/kernel', 'quant_conv/Conv_0/kernel',
          'post_quant_conv/Conv_0/kernel', 'encoder/conv_in/Conv_0/kernel',
          'decoder/mid_attn/q/kernel', 'decoder/conv_out/Conv_0/kernel'} <= kernels
  # Not decayed: conv/dense biases, GroupNorm scales and biases, and the VQ codebook.
  assert {p.rsplit('/', 1)[-1] for p in set(paths) - kernels} == {'bias', 'scale', 'codebook'}
  assert 'quantizer/codebook' in _rank_rule(params)   # the rank rule decayed the codebook


def test_optimizer_applies_decay_by_name_not_rank():
  """One AdamW step with zero gradients moves only what decays (a 2-D 'bias' stays put)."""
  tc = load_config('tiny').tokenizer.train
  tc.warmup_steps = 0                                # lr = peak at step 0
  tx, _ = engine.make_optimizer(tc, engine.Task(init=None, loss=None))
  params = {'blocks': {'bias': jnp.ones((3, 4)), 'kernel': jnp.ones((3, 4, 4))},
            'pos_embed': jnp.ones((5, 4)), 'pitch_embed': jnp.ones((5, 4))}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {p for p, u in _paths(updates).items() if np.any(np.asarray(u) != 0)}
  assert moved == {'blocks/kernel', 'pitch_embed'}
