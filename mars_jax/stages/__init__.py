"""One module a stage: `run(config, workdir)` and `is_complete(config, workdir)`."""
