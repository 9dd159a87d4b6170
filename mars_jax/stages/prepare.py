"""`prepare` stage: DIR/data/ prepared for the config (mars_jax.data.prepare does the work)."""
from mars_jax import workdir as workdir_lib
from mars_jax.config import ConfigError, derive
from mars_jax.data import prepare as data_prepare

NAME = 'prepare'


def is_complete(config, workdir) -> bool:
  return workdir_lib.complete(config, workdir, NAME)


def _refuse_replacing_trained_data(config, workdir, chash):
  """Data prepared for another config stay while checkpoints trained on them exist: replacing
  them would leave models whose pitch range and vocabulary no longer match their data."""
  old = workdir_lib.manifest_hash(workdir)
  if old is None or old == chash:
    return
  held = [t.path for t, _ in workdir_lib.foreign_checkpoints(config, workdir)]
  if held:
    raise ConfigError(
        f'{workdir_lib.data_dir(workdir)} holds data prepared for another config ({old}; this '
        f'config {chash}) and {", ".join(held)} hold checkpoints trained on them; nothing was '
        f'changed. Use a new --workdir for this config, or rerun the CLI with --force to delete '
        f'those checkpoints.')


def _log(msg):
  print(msg, flush=True)


def run(config, workdir, log=_log):
  """Prepares DIR/data for `config` (reusing matching shards); returns the manifest."""
  derive(config)   # a config error before anything is read
  d = workdir_lib.data_dir(workdir)
  chash = data_prepare.config_hash(config)
  if is_complete(config, workdir):
    log(f'[prepare] {d}: complete (config {chash}), nothing to do')
    return workdir_lib.load_manifest(workdir)
  _refuse_replacing_trained_data(config, workdir, chash)
  return data_prepare.write(config, d, log)
