"""One GPU, NSynth at full resolution: 512 x 512 -> CMX r=8 -> 64 x 64 x 64 -> 16 x 16 latent."""
from mars_jax import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = 'nsynth'
  c.data.path = 'nsynth'
  c.data.pitch_range = (24, 84)
  c.data.loader_workers = 8
  c.cmx.factor = 8
  c.tokenizer.channels = 128
  c.tokenizer.channel_mult = (1, 2, 2)   # 64 -> 16
  c.tokenizer.scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  c.tokenizer.train.compute_dtype = 'bfloat16'
  c.autoregressor.depth = 16
  c.autoregressor.train.compute_dtype = 'bfloat16'
  # Also save every 30 minutes of wall time: a preemption without SIGTERM (a maintenance
  # event, a lost node) then costs at most that, not the hours between step checkpoints.
  for stage in ('tokenizer', 'autoregressor', 'classifier'):
    c[stage].train.checkpoint_minutes = 30.0
  return c
