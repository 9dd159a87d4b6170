"""Embedded default: the whole pipeline on a 2-core CPU in minutes, on synthetic notes.

8 kHz, 1.024 s notes -> 128 x 128 spectrogram -> CMX r=8 -> 16 x 16 x 64 -> 8 x 8 latent.
CMX r=8 (not 4) with one down-sampling: a 32-wide tokenizer step costs 0.24 s on 2 cores
against 0.95 s for r=4 with two (measured 2026-11-25).
"""
from mars_jax import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = 'synthetic'
  c.data.pitch_range = (48, 71)
  c.data.synthetic.families = ('brass', 'flute', 'guitar', 'organ')
  c.data.synthetic.per_pitch_family = 6
  c.data.examples_per_shard = 256
  c.spectrogram.sample_rate = 8000
  c.spectrogram.duration = 1.024
  c.spectrogram.n_fft = 256
  c.spectrogram.hop = 64
  c.spectrogram.griffin_lim_iters = 32
  c.cmx.factor = 8
  c.tokenizer.channels = 32
  c.tokenizer.channel_mult = (1, 2)
  c.tokenizer.num_res_blocks = 1
  c.tokenizer.groups = 8
  c.tokenizer.latent_channels = 16
  c.tokenizer.codebook_size = 256
  c.tokenizer.scales = (1, 2, 4, 8)
  c.tokenizer.num_phi = 2
  # The tokenizer is where tiny lost pitch (BENCHMARKS.md): 900 steps (batch 16) took its round
  # trip from 62% to 91% within a semitone (32 valid notes), its eval MSE from 0.038 to 0.011.
  c.tokenizer.train.steps = 1800
  # Batch 8 x 1800 steps costs what 16 x 900 did (a step's cost is per example here) and, with
  # the level weighting below, took the soundfont round trip (264 held-out notes) from 90.2% to
  # 93.6% within a semitone, its notes with no detectable pitch from 18 to 2, MSE 0.0141 ->
  # 0.0113; on the synthetic notes the two are indistinguishable (100% / 98.6%, n = 72).
  c.tokenizer.train.batch_size = 8
  # Cadences as counts per run (defaults.py), so `--config.*.train.steps=N` moves them too:
  # 3 -> every 600 of the 1800 tokenizer steps; the autoregressor's default 4 -> every 100 of 400.
  c.tokenizer.train.checkpoints_per_run = 3
  c.tokenizer.train.evals_per_run = 3
  c.tokenizer.train.lr = 1e-3
  # Errors on loud bins (the harmonics) count up to 5x those on the noise floor: the round trip
  # of the 72 test notes went from 90.3% to 100% within a semitone, MSE 0.0121 -> 0.0100, at the
  # same steps (BENCHMARKS.md). Without it, lr 3e-3 or batch 8 x 1800 steps gave 95.8%, 97.2%.
  c.tokenizer.level_weight = 4.0
  # Narrower than VAR's 64*depth: at width 256 one step (batch 32 x 85 tokens) is ~50 GFLOP,
  # 1.7 s on 2 cores; width 128 with depth 3 keeps it a fraction of that.
  c.autoregressor.depth = 3
  c.autoregressor.width = 128
  c.autoregressor.heads = 4
  c.autoregressor.train.steps = 400
  c.autoregressor.train.batch_size = 32
  # 1e-3 left it undertrained at 400 steps (eval loss still falling; 80% of the generated notes
  # on pitch against a 100% round trip); 3e-3 reaches 100% (n = 96) in the same time.
  c.autoregressor.train.lr = 3e-3
  c.sample.num = 96                # ~5-point standard error on pitch accuracy
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  # From `python -m mars_jax.bench sweep` (BENCHMARKS.md): on the synthetic notes every cfg in
  # 0..3 puts >= 99% of the notes on pitch; on realistic instruments (soundfont) cfg 3 gave
  # 96.9% +- 1.8 against 89.6% +- 3.1 unguided. Nucleus and top-k filters changed nothing.
  c.sample.cfg = 3.0
  c.evaluate.ndb_bins = 10
  c.classifier.widths = (16, 32)
  c.classifier.train.steps = 150
  c.classifier.train.batch_size = 32
  c.classifier.train.checkpoints_per_run = 2   # one save and one held-out check mid-run
  c.classifier.train.evals_per_run = 2
  return c
