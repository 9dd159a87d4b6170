"""One module a stage: `run(config, workdir)` and `is_complete(config, workdir)`.

The table of stages lives here, below mars_jax.main, so that code below the CLI (the workdir
checks) can reach a stage without importing mars_jax.main, which `python -m mars_jax.main` runs
as __main__: importing it again would define its flags twice.
"""
STAGES = ('prepare', 'tokenizer', 'autoregressor', 'sample', 'evaluate')
MODULES = {
    'prepare': 'mars_jax.data.prepare',
    'tokenizer': 'mars_jax.stages.tokenizer',
    'autoregressor': 'mars_jax.stages.autoregressor',
    'sample': 'mars_jax.stages.sample',
    'evaluate': 'mars_jax.stages.evaluate',
}
