"""The real models' train steps on 8 simulated devices (data x fsdp x tensor = 2 x 2 x 2) equal
the single-device steps: same losses, same updated parameters.

The single-device autoregressor step runs the frozen tokenizer's encoder inside it; the
8-device one reads its targets from the token table, itself encoded on the 8 devices
(stages/token_table.py), so the comparison covers both models' sharded forward and the cache.
The tokenizer's own train step is left to tests/test_engine.py's equality tests (compiling it
twice more on 2 cores costs minutes of the suite's budget)."""
import json
import os

import jax
import numpy as np
import pytest

from mars_jax import config as config_lib
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.data import pipeline
from mars_jax.stages import autoregressor as ar_stage
from mars_jax.stages import token_table
from mars_jax.stages import tokenizer as tok_stage
from mars_jax.train import engine, partitioning

LAYOUTS = {'one': ((1, 1, 1), 1), 'dft': ((2, 2, 2), 8)}


def _config(base, stage, layout):
  c = base.copy_and_resolve_references()
  (c.mesh.data, c.mesh.fsdp, c.mesh.tensor), _ = LAYOUTS[layout]
  t = c[stage].train
  t.steps, t.checkpoint_every, t.log_every, t.eval_every, t.warmup_steps = 2, 2, 1, 100, 1
  c.tokenizer.dead_code_reseed = False   # its random pick of rows is not what is compared here
  return c


def _run(base, workdir, tmp_path, stage, layout):
  c = _config(base, stage, layout)
  devices = jax.devices()[:LAYOUTS[layout][1]]
  data_dir = workdir_lib.data_dir(workdir)
  if stage == 'tokenizer':
    task, _ = tok_stage.make_task(c)
  else:
    mesh = partitioning.make_mesh(c, devices)
    tok_params, tok_model = trained.load_tokenizer(c, workdir, mesh)
    n_inst = trained.num_instruments(c, pipeline.load_manifest(data_dir))
    tokens = None
    if layout == 'dft':
      table = token_table.encode_split(c, data_dir, mesh, tok_model, tok_params)
      tokens = token_table.to_device(table, mesh)
    task, _ = ar_stage.make_task(c, config_lib.derive(c), n_inst, tok_model, tok_params, tokens)
  out = str(tmp_path / f'{stage}-{layout}')
  state = engine.train(task, c, stage, out, devices=devices,
                       train_iter_fn=lambda: pipeline.make_iterator(
                           c, data_dir, 'train', batch_size=c[stage].train.batch_size))
  with open(os.path.join(out, 'metrics.jsonl')) as f:
    losses = [json.loads(line)['loss'] for line in f]
  return losses, jax.device_get(state.params), state


@pytest.mark.parametrize('stage', ['autoregressor'])
def test_sharded_step_equals_single_device(trained_workdir, tmp_path, stage):
  workdir, base = trained_workdir
  loss1, params1, _ = _run(base, workdir, tmp_path, stage, 'one')
  loss8, params8, state8 = _run(base, workdir, tmp_path, stage, 'dft')
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-6)
  flat1 = jax.tree_util.tree_flatten_with_path(params1)[0]
  flat8 = jax.tree.leaves(params8)
  for (path, a), b in zip(flat1, flat8):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  # And the 8-device run really was sharded: some parameter lives split over several devices.
  split = [x for x in jax.tree.leaves(state8.params) if not x.sharding.is_fully_replicated]
  assert split, 'no parameter was sharded on the 2x2x2 mesh'
