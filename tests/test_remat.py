"""autoregressor.remat: the same loss and gradients, less activation memory (#16 item 8)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mars_jax.models import autoregressor as ar
from mars_jax.train import engine
from tests.helpers import load_config

V, D, SCALES, B = 64, 8, (1, 2, 4), 4
L = sum(p * p for p in SCALES)
FAST_COMPILE = {'xla_backend_optimization_level': 0}   # LLVM effort only: the HLO is the same


def _run(fn, *args):
  """fn(*args) as one program compiled cheaply (eager init would compile op by op, ~14 s)."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _model(remat):
  return ar.VAR(vocab_size=V, code_dim=D, scales=SCALES, num_pitches=8, num_instruments=2,
                depth=3, width=64, heads=2, label_dropout=0.1, drop_path=0.2, remat=remat)


def test_remat_gives_the_same_loss_and_gradients():
  rng = np.random.default_rng(0)
  pitch = jnp.asarray(np.arange(B) % 8, jnp.int32)
  inst = jnp.asarray(np.arange(B) % 2, jnp.int32)
  teacher = jnp.asarray(rng.standard_normal((B, L - 1, D)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  params = nn.unbox(_run(_model('none').init, jax.random.key(0), pitch, inst, teacher)['params'])
  # Perturbed: at init the AdaLN gates are ~0 and most gradients would be ~0 too.
  params = jax.tree.map(
      lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)

  def loss_and_grad(remat):
    model = _model(remat)

    def loss_fn(p):   # train=True: label dropout and drop path draw from the dropout rng
      logits = model.apply({'params': p}, pitch, inst, teacher, train=True,
                           rngs={'dropout': jax.random.key(3)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return _run(jax.value_and_grad(loss_fn), params)

  loss0, grad0 = loss_and_grad('none')
  for remat in ('dots', 'full'):
    loss, grad = loss_and_grad(remat)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grad, grad0)


def _compiled_step_memory(remat, batch=8):
  """Memory of the VAR train step engine.train compiles, on one device (compile only; the
  frozen tokenizer's parameters are abstract too)."""
  from mars_jax import config as config_lib
  from mars_jax.stages import autoregressor as ar_stage
  from mars_jax.stages import tokenizer as tok_stage
  from mars_jax.train import partitioning as part
  c = load_config('tiny')
  c.autoregressor.depth, c.autoregressor.width, c.autoregressor.heads = 8, 128, 4
  c.autoregressor.remat = remat
  c.tokenizer.channels, c.tokenizer.groups = 16, 4   # the frozen encoder: small, quick to compile
  c.autoregressor.train.batch_size = batch
  shapes = config_lib.derive(c)
  mesh = part.make_mesh(c, devices=jax.devices()[:1])
  local = {'image': np.zeros((batch,) + tuple(shapes.image), np.float32),
           'pitch': np.zeros((batch,), np.int32), 'instrument': np.zeros((batch,), np.int32)}
  tok_task, tok_model = tok_stage.make_task(c, shapes)
  tok_params = nn.unbox(jax.eval_shape(tok_task.init, jax.random.key(1),
                                       {'image': local['image']}))
  rep = part.replicated(mesh)
  tok_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            tok_params)
  task, _ = ar_stage.make_task(c, shapes, 4, tok_model, tok_params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.logical_rules(c)):
    step = engine.TrainStep(task, c, 'autoregressor', mesh, part.abstract_batch(local, mesh))
    return engine.step_memory(step.compile(FAST_COMPILE))


@pytest.mark.slow   # two compiles: ~15 s each on 2 busy cores
def test_full_remat_lowers_activation_memory():
  none, full = _compiled_step_memory('none'), _compiled_step_memory('full')
  if not none:
    pytest.skip('no memory analysis on this backend')
  # Same train state either way; the saved activations (temporaries) shrink.
  assert full['argument_size_in_bytes'] == none['argument_size_in_bytes']
  assert full['temp_size_in_bytes'] < 0.5 * none['temp_size_in_bytes'], (full, none)


def test_memory_warning():
  mem = {'argument_size_in_bytes': 2**30, 'temp_size_in_bytes': 3 * 2**30,
         'total_minus_alias_bytes': 4 * 2**30}
  assert engine.memory_warning('autoregressor', mem, None) is None
  assert engine.memory_warning('autoregressor', mem, 8 * 2**30) is None
  msg = engine.memory_warning('autoregressor', mem, 2 * 2**30)
  assert '4.0 GiB' in msg and 'autoregressor.remat' in msg
