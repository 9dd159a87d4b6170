"""The mission's resolution on a 2-core CPU: 16 kHz, 4 s notes from a General MIDI SoundFont.

16 kHz, 4.0 s -> n_fft 1024, hop 125 -> 512 x 512 spectrogram (base's front end and Griffin-Lim)
-> CMX r=16 -> 32 x 32 x 256 image -> one down-sampling -> 16 x 16 latent (base's latent side).

What each choice costs and buys (2-core CPU, 2026-11-30, `bench.tokenizer.Step` medians;
BENCHMARKS.md "configs/small.py"):
  * CMX r=16 (not base's 8): a 32 x 32 x 256 image, so a 32-wide tokenizer with one down-sampling
    reaches base's 16 x 16 latent; its train step is 0.50 s at batch 8 (63 ms a note, 4x tiny's).
    Width 64 costs 1.24 s (2.5x); r=8 would need a 64 x 64 input and another down-sampling.
  * Scales (1, 2, 4, 8, 16), 341 tokens: the depth-4, width-128 VAR step is 1.16 s at batch 16;
    VAR's ten scales to 16 (680 tokens) cost 3.26 s (2.8x), (1, 2, 3, 4, 6, 8, 11, 16) (507)
    1.97 s (1.7x).
  * The rest follows tiny's measured recipe (level-weighted loss, lr, cfg 3): ~15 minutes for
    the tokenizer, ~11 for the autoregressor, 45 at most for the whole pipeline.
Measured (TimGM6mb, 2112 notes, held-out programs; BENCHMARKS.md): the whole pipeline in 36.6
minutes; 96.9% +- 1.8 of the generated notes and 95.8% +- 2.0 of the round trips within a
semitone (n = 96 each).
"""
from mars_jax import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = 'soundfont'
  c.data.pitch_range = (48, 71)        # tiny's two octaves: 2112 notes from TimGM6mb's programs
  c.data.examples_per_shard = 256      # 512 x 512 float16 = 512 KiB a note: 128 MiB shards
  c.cmx.factor = 16
  c.tokenizer.channels = 32
  c.tokenizer.channel_mult = (1, 2)
  c.tokenizer.num_res_blocks = 1
  c.tokenizer.groups = 8
  c.tokenizer.latent_channels = 16
  c.tokenizer.codebook_size = 512
  c.tokenizer.scales = (1, 2, 4, 8, 16)   # 341 tokens (see above)
  c.tokenizer.num_phi = 2
  c.tokenizer.level_weight = 4.0       # harmonics count 5x the noise floor (configs/tiny.py)
  c.tokenizer.train.steps = 1500
  c.tokenizer.train.batch_size = 8
  c.tokenizer.train.lr = 1e-3
  c.tokenizer.train.checkpoints_per_run = 3
  c.tokenizer.train.evals_per_run = 3
  c.autoregressor.depth = 4
  c.autoregressor.width = 128
  c.autoregressor.heads = 4
  c.autoregressor.train.steps = 500
  c.autoregressor.train.batch_size = 16   # 4x tiny's tokens a note: 8000 notes seen in ~11 min
  c.autoregressor.train.lr = 3e-3
  c.sample.num = 96                    # ~2-5-point standard error on pitch accuracy
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.cfg = 3.0
  c.evaluate.ndb_bins = 10
  c.classifier.widths = (16, 32)
  c.classifier.train.steps = 150
  c.classifier.train.batch_size = 32
  c.classifier.train.checkpoints_per_run = 2
  c.classifier.train.evals_per_run = 2
  return c
