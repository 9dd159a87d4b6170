"""The training recipe where it must match the reference VAR: initialisation statistics, AdaLN
gate init by depth, stochastic depth, a float32 head under bf16, float32 quantizer convolutions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from mars_jax import config as config_lib
from mars_jax.models import autoregressor as ar
from mars_jax.models import layers
from mars_jax.models.tokenizer import Tokenizer

V, D, SCALES = 32, 8, (1, 2, 4)
L = sum(p * p for p in SCALES)
B = 4
IDS = jnp.arange(B, dtype=jnp.int32) % 4


def _model(**kw):
  base = dict(vocab_size=V, code_dim=D, scales=SCALES, num_pitches=4, num_instruments=4,
              depth=3, width=32, heads=2, label_dropout=0.0)
  return ar.VAR(**{**base, **kw})


def _teacher():
  return jnp.asarray(np.random.default_rng(0).standard_normal((B, L - 1, D)), jnp.float32)


def _noisy_params(model):
  """Init params plus noise: at init the gates are ~0 and would hide every block."""
  p = model.init(jax.random.key(0), IDS, IDS, _teacher())['params']
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape),
                                            jnp.float32), jax.tree.map(jnp.asarray, p))


def test_truncated_normal_has_the_configured_std():
  x = np.asarray(layers.trunc_normal(0.02)(jax.random.key(0), (400_000,)))
  assert abs(x.std() / 0.02 - 1) < 0.01          # jax's own initializer gives 0.88
  assert np.abs(x).max() <= 2 * 0.02 / 0.8796 + 1e-9


@pytest.mark.slow
def test_gate_init_and_drop_path_follow_depth_unless_set():
  config = load_config('tiny')
  shapes = config_lib.derive(config)
  m = ar.from_config(config, shapes, num_instruments=4)
  assert (m.gate_init, m.drop_path) == (1e-3, 0.1 * 3 / 24)
  config.autoregressor.depth, config.autoregressor.heads = 24, 4
  m = ar.from_config(config, shapes, num_instruments=4)
  assert m.gate_init == 1e-4 and abs(m.drop_path - 0.1) < 1e-12
  config.autoregressor.gate_init, config.autoregressor.drop_path = 3e-2, 0.0
  m = ar.from_config(config, shapes, num_instruments=4)
  assert (m.gate_init, m.drop_path) == (3e-2, 0.0)
  # The gate chunks of every block's AdaLN projection start gate_init / 0.5 as large as the rest.
  small = _model(gate_init=1e-3)
  ada = np.asarray(small.init(jax.random.key(0), IDS, IDS, _teacher())['params']
                   ['blocks']['ada']['kernel'].value)                  # (depth, C, 6C)
  c = small.width
  ratio = ada[..., :2 * c].std() / ada[..., 2 * c:].std()
  assert abs(ratio / (1e-3 / 0.5) - 1) < 0.1


@pytest.mark.slow
def test_drop_path_only_in_training_and_never_at_the_first_block():
  plain, dropped = _model(), _model(drop_path=0.5)
  params = {'params': _noisy_params(plain)}
  t = _teacher()
  run = lambda m, train, seed: np.asarray(m.apply(params, IDS, IDS, t, train=train,
                                                  rngs={'dropout': jax.random.key(seed)}))
  # Evaluation and sampling never drop: the same function as a model without drop path.
  np.testing.assert_array_equal(run(dropped, False, 0), run(plain, False, 0))
  # Training without drop path (and no label dropout) is deterministic; with it, it is not.
  np.testing.assert_array_equal(run(plain, True, 0), run(plain, True, 1))
  outs = [run(dropped, True, s) for s in range(4)]
  assert any(np.abs(outs[0] - o).max() > 1e-4 for o in outs[1:])
  # The rate rises linearly from 0 at the first block: a one-block model never drops.
  one, one_plain = _model(depth=1, drop_path=0.5), _model(depth=1)
  p1 = {'params': _noisy_params(one_plain)}
  np.testing.assert_array_equal(
      np.asarray(one.apply(p1, IDS, IDS, t, train=True, rngs={'dropout': jax.random.key(3)})),
      np.asarray(one_plain.apply(p1, IDS, IDS, t, train=True,
                                 rngs={'dropout': jax.random.key(3)})))


@pytest.mark.slow
def test_head_and_logits_are_float32_under_bf16():
  m = _model(dtype=jnp.bfloat16)
  params = {'params': _noisy_params(_model())}
  logits = np.asarray(m.apply(params, IDS, IDS, _teacher()))
  assert logits.dtype == np.float32
  as_bf16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(logits != as_bf16) > 0.9        # not bf16 values cast up at the end


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (pjit, custom_jvp, ...) included."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _eqns(inner)


def test_quantizer_convolutions_run_at_highest_precision():
  config = load_config('tiny')
  shapes = config_lib.derive(config)
  tok = Tokenizer.from_config(config.tokenizer, shapes, dtype=jnp.bfloat16)
  x = jnp.zeros((1,) + tuple(shapes.image), jnp.float32)
  params = jax.eval_shape(tok.init, jax.random.key(0), x)
  closed = jax.make_jaxpr(lambda p: tok.apply(p, x, method=Tokenizer.encode_tokens))(params)
  convs = [str(e.params['precision']) for e in _eqns(closed.jaxpr)
           if e.primitive.name == 'conv_general_dilated']
  highest = [c for c in convs if 'HIGHEST' in c]
  # quant_conv plus, per scale, one phi: every one at HIGHEST; encoder convs (bf16) are not.
  assert len(highest) >= 1 + len(shapes.scales) - 1, highest
  assert len(highest) < len(convs)
