"""`autoregressor` stage: trains the VAR on token maps of the frozen tokenizer.

The tokenizer's params ride into the jitted step as `frozen` jit arguments. The step's targets
come from a table of every train example's tokens, encoded once when the stage starts
(stages/token_table.py, config.autoregressor.token_cache), or, without it, from an encoder
forward pass inside the step; either way the teacher-forcing inputs are rebuilt from the tokens
in the step (a few codebook lookups and up-samplings).
"""

import jax
import jax.numpy as jnp

from mars_jax import config as config_lib
from mars_jax import progress
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.models import autoregressor as ar
from mars_jax.models.tokenizer import Tokenizer
from mars_jax.stages import token_table
from mars_jax.train import engine, partitioning

NAME = 'autoregressor'


def teacher_inputs(tok_model, tok_params, flat, scales):
  """Flat tokens (B, L) -> teacher-forcing inputs (B, L - p_0^2, d), constants for the VAR."""
  maps = token_table.scale_maps(flat, scales)
  teacher = tok_model.apply({'params': tok_params}, maps, method=Tokenizer.idx_to_teacher_inputs)
  return jax.lax.stop_gradient(teacher)


def token_targets(tok_model, tok_params, images):
  """Frozen tokenizer: images -> (flat tokens (B, L) int32, teacher inputs (B, L - p_0^2, d))."""
  flat = token_table.flat_tokens(tok_model, tok_params, images)
  return flat, teacher_inputs(tok_model, tok_params, flat, tuple(tok_model.scales))


def _scores(logits, flat, scales):
  """Cross-entropy per token and accuracy per scale."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)            # (B, L, V)
  nll = -jnp.take_along_axis(logp, flat[..., None], axis=-1)[..., 0]          # (B, L)
  hit = (jnp.argmax(logits, -1) == flat).astype(jnp.float32)                  # (B, L)
  per_scale = {f'acc_{k}': hit[:, a:b].mean(1)
               for k, (a, b) in enumerate(ar.scale_bounds(scales))}
  return nll, hit, per_scale


def make_task(config, shapes, n_instruments, tok_model, tok_params=None, tokens=None):
  """The VAR as an engine Task. `tok_params` (sharded arrays) and, when given, `tokens` (the
  cached table (N, L), replicated: token_table.to_device) ride along as `frozen`; with the
  table, train steps read their targets from it by the batch's 'index'."""
  model = ar.from_config(config, shapes, n_instruments)
  init = trained.var_init(model, shapes)
  frozen = {'tokenizer': tok_params}
  if tokens is not None:
    frozen['tokens'] = tokens

  def train_targets(batch, frozen):
    if 'tokens' not in frozen:
      return token_targets(tok_model, frozen['tokenizer'], batch['image'])
    flat = frozen['tokens'][batch['index']].astype(jnp.int32)                  # (B, L)
    return flat, teacher_inputs(tok_model, frozen['tokenizer'], flat, shapes.scales)

  def loss(params, batch, rng, step, frozen):
    flat, teacher = train_targets(batch, frozen)
    logits = model.apply({'params': params}, batch['pitch'], batch['instrument'], teacher,
                         train=True, rngs={'dropout': rng})
    nll, hit, per_scale = _scores(logits, flat, shapes.scales)
    value = nll.mean()
    return engine.Loss(value, {'loss': value, 'acc': hit.mean(),
                               **{k: v.mean() for k, v in per_scale.items()}})

  def eval_fn(params, batch, frozen):   # held-out examples: not in the table
    flat, teacher = token_targets(tok_model, frozen['tokenizer'], batch['image'])
    logits = model.apply({'params': params}, batch['pitch'], batch['instrument'], teacher)
    nll, hit, per_scale = _scores(logits, flat, shapes.scales)
    m = batch['mask'].astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    out = {'loss': (nll.mean(1) * m).sum() / n, 'acc': (hit.mean(1) * m).sum() / n}
    out.update({k: (v * m).sum() / n for k, v in per_scale.items()})
    return out

  return engine.Task(init=init, loss=loss, eval_fn=eval_fn, frozen=frozen), model


def is_complete(config, workdir):
  return workdir_lib.complete(config, workdir, NAME)


def run(config, workdir):
  shapes = config_lib.derive(config)
  if not workdir_lib.complete(config, workdir, 'tokenizer'):
    raise config_lib.ConfigError(
        f'the autoregressor needs a trained tokenizer for this config in {workdir}/tokenizer; '
        f'run --stages=tokenizer first.')
  stage_dir = workdir_lib.stage_dir(workdir, NAME)
  fp = workdir_lib.fingerprint(config, NAME)
  workdir_lib.claim(stage_dir, fp, NAME)
  manifest = workdir_lib.load_manifest(workdir)
  config_lib.validate_batch(config, NAME, jax.device_count(), jax.process_count())
  mesh = partitioning.make_mesh(config)
  tok_params, tok_model = trained.load_tokenizer(config, workdir, mesh)
  n_train = int(manifest['splits']['train']['count'])
  tc, mode = config.autoregressor.train, config.autoregressor.token_cache
  tokens = None
  if token_table.wanted(config, n_train):
    progress.say(f'{NAME}: encoding the {n_train} train examples once (autoregressor.'
                 f'token_cache={mode!r}; {tc.steps} steps x batch {tc.batch_size} read them '
                 f'{tc.steps * tc.batch_size / n_train:.3g} times)')
    tokens = token_table.to_device(token_table.encode_split(  # no int32 copy kept on the host
        config, workdir_lib.data_dir(workdir), mesh, tok_model, tok_params), mesh)
  else:
    progress.say(f'{NAME}: the tokenizer encodes every batch in the train step '
                 f'(autoregressor.token_cache={mode!r})')
  task, _ = make_task(config, shapes, trained.num_instruments(config, manifest), tok_model,
                      tok_params, tokens)
  # With the table, train batches need no spectrograms: none decoded, none sent to the devices.
  trained.train(task, config, NAME, stage_dir, workdir, fp, train_images=tokens is None)
