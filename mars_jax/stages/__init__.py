"""The table of stages, in pipeline order: what main.py walks.

Each stage module has `run(config, workdir)` and `is_complete(config, workdir)`; its folder and
the config sections of its fingerprint come from mars_jax.workdir, which owns the layout. Stage
modules are imported when a stage is used, not here: `python -m mars_jax.main` reads this table
before it has parsed its flags.
"""
import dataclasses
import importlib

from mars_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  folder: str          # under the workdir
  sections: tuple      # config sections its fingerprint covers
  module: str          # where its run and is_complete live

  def run(self, config, workdir):
    return importlib.import_module(self.module).run(config, workdir)

  def is_complete(self, config, workdir) -> bool:
    return importlib.import_module(self.module).is_complete(config, workdir)


TABLE = tuple(Stage(name, workdir_lib.FOLDERS[name], workdir_lib.SECTIONS[name],
                    f'mars_jax.stages.{name}')
              for name in ('prepare', 'tokenizer', 'autoregressor', 'sample', 'evaluate'))
STAGES = tuple(s.name for s in TABLE)
BY_NAME = {s.name: s for s in TABLE}
