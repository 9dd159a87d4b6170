"""stages/token_table.py: the autoregressor's targets from a table encoded once equal the ones its
step would encode, row for row and loss for loss."""
import jax
import numpy as np
import pytest
from flax.linen import meta

from mars_jax import config as config_lib
from mars_jax import trained
from mars_jax import workdir as workdir_lib
from mars_jax.data import pipeline
from mars_jax.stages import autoregressor as ar_stage
from mars_jax.stages import token_table
from mars_jax.train import partitioning
from tests.helpers import load_config


def test_scale_maps_invert_the_join_of_flat_tokens():
  scales = (1, 2, 4, 8)
  flat = np.random.default_rng(0).integers(0, 256, (3, sum(p * p for p in scales)))
  maps = token_table.scale_maps(flat, scales)
  assert [m.shape for m in maps] == [(3, p, p) for p in scales]
  np.testing.assert_array_equal(np.concatenate([m.reshape(3, -1) for m in maps], 1), flat)


@pytest.mark.parametrize('mode,steps,batch,n,expected', [
    ('auto', 10, 8, 80, True), ('auto', 10, 8, 81, False), ('on', 1, 1, 10**6, True),
    ('off', 10**6, 256, 1, False)])
def test_the_table_is_built_when_the_run_reads_the_split_at_least_once(mode, steps, batch, n,
                                                                       expected):
  c = load_config('tiny')
  c.autoregressor.token_cache = mode
  c.autoregressor.train.steps, c.autoregressor.train.batch_size = steps, batch
  assert token_table.wanted(c, n) is expected


def test_an_unknown_mode_is_refused_by_name():
  c = load_config('tiny')
  c.autoregressor.token_cache = 'yes'
  with pytest.raises(config_lib.ConfigError, match='autoregressor.token_cache'):
    config_lib.derive(c)


@pytest.fixture(scope='module')
def cached(trained_workdir):
  """(config, mesh, tokenizer params and model, the train split's table, one train batch)."""
  workdir, config = trained_workdir
  mesh = partitioning.make_mesh(config, jax.devices()[:1])
  tok_params, tok_model = trained.load_tokenizer(config, workdir, mesh)
  data_dir = workdir_lib.data_dir(workdir)
  table = token_table.encode_split(config, data_dir, mesh, tok_model, tok_params, batch_size=8)
  batch = next(pipeline.make_iterator(config, data_dir, 'train', batch_size=16, seed=5,
                                      worker_count=0))
  return config, mesh, tok_params, tok_model, table, batch


def test_every_row_holds_the_tokens_the_step_would_encode(cached, trained_workdir):
  config, mesh, tok_params, tok_model, table, batch = cached
  manifest = pipeline.load_manifest(workdir_lib.data_dir(trained_workdir[0]))
  n = int(manifest['splits']['train']['count'])
  assert table.shape == (n, config_lib.derive(config).num_tokens) and (table >= 0).all()
  with jax.set_mesh(mesh):
    encoded = jax.jit(lambda p, x: token_table.flat_tokens(tok_model, p, x))(
        tok_params, partitioning.put_batch(batch, mesh)['image'])
  # a batch of 16 shuffled examples, encoded together, against rows encoded in batches of 8
  np.testing.assert_array_equal(np.asarray(encoded), table[batch['index']])


def test_the_cached_train_loss_equals_the_encoded_one(cached, trained_workdir):
  config, mesh, tok_params, tok_model, table, batch = cached
  shapes = config_lib.derive(config)
  n_inst = trained.num_instruments(config, pipeline.load_manifest(
      workdir_lib.data_dir(trained_workdir[0])))
  plain, _ = ar_stage.make_task(config, shapes, n_inst, tok_model, tok_params)
  fast, _ = ar_stage.make_task(config, shapes, n_inst, tok_model, tok_params,
                               token_table.to_device(table, mesh))
  with jax.set_mesh(mesh):
    device = partitioning.put_batch(batch, mesh)
    params = meta.unbox(jax.jit(plain.init)(jax.random.PRNGKey(0), device))
    rng = jax.random.PRNGKey(1)
    losses = [jax.jit(lambda p, b, f, task=task: task.loss(p, b, rng, 0, f).value)(
        params, device, task.frozen) for task in (plain, fast)]
  assert float(losses[0]) == float(losses[1])


@pytest.mark.parametrize('top,dtype', [(2**16 - 1, np.uint16), (2**16, np.int32)])
def test_the_device_table_holds_the_same_tokens_in_the_smallest_type_that_fits(top, dtype):
  mesh = partitioning.make_mesh(load_config('tiny'), jax.devices()[:1])
  table = np.array([[0, 1, top], [top, 7, 3]], np.int32)
  on_device = token_table.to_device(table, mesh)
  assert on_device.dtype == dtype
  np.testing.assert_array_equal(np.asarray(on_device), table)
