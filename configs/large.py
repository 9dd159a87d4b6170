"""TPU pod slice: full NSynth, a large tokenizer, VAR depth 24, data x fsdp mesh, bf16."""
from mars_jax import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = 'nsynth'
  c.data.path = 'gs://YOUR_BUCKET/nsynth'
  c.data.pitch_range = (21, 108)
  c.data.loader_workers = 16
  c.cmx.factor = 8
  c.tokenizer.channels = 160
  c.tokenizer.channel_mult = (1, 2, 2)
  c.tokenizer.train.batch_size = 512
  c.tokenizer.train.compute_dtype = 'bfloat16'
  c.autoregressor.depth = 24
  c.autoregressor.train.batch_size = 1024
  # VAR's rule: the peak learning rate grows with the global batch, lr = 1e-4 * batch / 256
  # (4e-4 here). A --config override of the batch should scale lr the same way.
  c.autoregressor.train.lr = 1e-4 * c.autoregressor.train.batch_size / 256
  c.autoregressor.train.compute_dtype = 'bfloat16'
  # Saved activations, not the train state, decide the fit. Compile-only on CPU (one device,
  # batch 1 and 2, bf16, einsum attention as on TPU), the step's temporaries grow by ~5.5 GiB
  # per example without remat: ~88 GiB at this config's 16 examples per chip (1024 / 64), over
  # a v5p's 95 GiB with the state. With 'dots' ~0.14 GiB per example ('full' ~0.18): ~2 GiB.
  # 'dots' keeps the weight-matmul outputs and recomputes attention, norms and GELU.
  c.autoregressor.remat = 'dots'
  # Also save every 30 minutes of wall time: a preemption without SIGTERM (a maintenance
  # event, a lost node) then costs at most that, not the hours between step checkpoints.
  for stage in ('tokenizer', 'autoregressor', 'classifier'):
    c[stage].train.checkpoint_minutes = 30.0
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.mesh.tensor = 1
  # Per-chip budget for the train state (fp32 params + AdamW mu/nu + EMA), checked by
  # tests/test_large_config.py on a 64-chip mesh. A v5p chip has 95 GiB HBM; the rest is for
  # activations, the bf16 compute copy and XLA temporaries.
  c.mesh.memory_budget_gib = 16.0
  return c
