"""`autoregressor` stage: trains the VAR on token maps of the frozen tokenizer.

Tokens and teacher-forcing inputs are computed on the fly inside the jitted step from
the tokenizer's params, which the engine passes as `frozen` jit arguments. On the tiny
config this costs one encoder forward a step; precomputed token shards would save it
at the price of a second dataset format and a re-run whenever the tokenizer changes.
"""

import jax
import jax.numpy as jnp

from mars_jax import config as config_lib
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.models import autoregressor as ar
from mars_jax.models.tokenizer import Tokenizer
from mars_jax.train import engine, partitioning

NAME = 'autoregressor'


def token_targets(tok_model, tok_params, images):
  """Frozen tokenizer: images -> (flat tokens (B, L) int32, teacher inputs (B, L - p_0^2, d))."""
  tokens = tok_model.apply({'params': tok_params}, images, method=Tokenizer.encode_tokens)
  teacher = tok_model.apply({'params': tok_params}, tokens, method=Tokenizer.idx_to_teacher_inputs)
  flat = jnp.concatenate([t.reshape(t.shape[0], -1) for t in tokens], axis=1)
  return flat, jax.lax.stop_gradient(teacher)


def _scores(logits, flat, scales):
  """Cross-entropy per token and accuracy per scale."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)            # (B, L, V)
  nll = -jnp.take_along_axis(logp, flat[..., None], axis=-1)[..., 0]          # (B, L)
  hit = (jnp.argmax(logits, -1) == flat).astype(jnp.float32)                  # (B, L)
  per_scale = {f'acc_{k}': hit[:, a:b].mean(1)
               for k, (a, b) in enumerate(ar.scale_bounds(scales))}
  return nll, hit, per_scale


def make_task(config, shapes, n_instruments, tok_model, tok_params=None):
  """The VAR as an engine Task; `tok_params` (sharded arrays) ride along as `frozen`."""
  model = ar.from_config(config, shapes, n_instruments)
  init = trained.var_init(model, shapes)

  def loss(params, batch, rng, step, frozen):
    flat, teacher = token_targets(tok_model, frozen, batch['image'])
    logits = model.apply({'params': params}, batch['pitch'], batch['instrument'], teacher,
                         train=True, rngs={'dropout': rng})
    nll, hit, per_scale = _scores(logits, flat, shapes.scales)
    value = nll.mean()
    return engine.Loss(value, {'loss': value, 'acc': hit.mean(),
                               **{k: v.mean() for k, v in per_scale.items()}})

  def eval_fn(params, batch, frozen):
    flat, teacher = token_targets(tok_model, frozen, batch['image'])
    logits = model.apply({'params': params}, batch['pitch'], batch['instrument'], teacher)
    nll, hit, per_scale = _scores(logits, flat, shapes.scales)
    m = batch['mask'].astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    out = {'loss': (nll.mean(1) * m).sum() / n, 'acc': (hit.mean(1) * m).sum() / n}
    out.update({k: (v * m).sum() / n for k, v in per_scale.items()})
    return out

  return engine.Task(init=init, loss=loss, eval_fn=eval_fn, frozen=tok_params), model


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
  task, _ = make_task(config, shapes, trained.num_instruments(config, manifest), tok_model,
                      tok_params)
  trained.train(task, config, NAME, stage_dir, workdir, fp)
