"""Every config field with its default; configs/*.py state only what differs.

Field names are a contract (README.md's `--config.a.b=value` overrides, configs/*.py, the
config.json saved in every workdir): keep their names and meanings. Shapes are never set here
directly; they are derived once, in `mars_jax.config.derive`, from the fields below.
"""
import collections

import ml_collections as mlc


def _train(steps, batch_size, lr):
  """One stage's training settings.

  Derived fields follow the fields they derive from, whoever sets those (this file, a config file,
  `--config.<stage>.train.steps=N`, Python): each is an ml_collections FieldReference computed
  when read, so changing `steps` (or a fraction / count below) moves it too, and config.json
  (written with every reference resolved) records the numbers actually used. Setting a derived
  field itself (`warmup_steps = 500`, `--config.<stage>.train.eval_every=50`) replaces the rule
  with that value: an explicit value always wins. The rule, for every stage:

    warmup_steps     = round(steps * warmup_fraction)          (nearest integer)
    checkpoint_every = ceil(steps / checkpoints_per_run)       (so >= 1)
    eval_every       = ceil(steps / evals_per_run)             (so >= 1)

  With steps >= 2 and a count >= 2, at least one checkpoint and one eval happen before the last
  step (the engine also saves and evaluates at the last step, whatever the cadence).
  The learning rate rises linearly from 0 over the warm-up to `lr`, then follows a cosine to
  `lr * end_lr_fraction`, reached exactly at the last step (step `steps - 1`).
  """
  t = mlc.ConfigDict()
  t.steps = steps
  t.batch_size = batch_size          # global batch, over all processes
  t.checkpoints_per_run = 4          # checkpoint_every derives from it (see above)
  t.checkpoint_every = _derived(_ceil_div, t.get_ref('steps'), t.get_ref('checkpoints_per_run'))
  t.keep_checkpoints = 2
  t.checkpoint_minutes = 0.0         # > 0: also save when this much wall time passed since the
                                     # last save (a preemption without SIGTERM loses less)
  t.preemption_check_every = 10     # several processes: SIGTERM / timed saves are agreed in a
                                     # blocking all-gather at every this-many steps (1 = each step)
  t.log_every = 10
  t.evals_per_run = 4                # eval_every derives from it (see above)
  t.eval_every = _derived(_ceil_div, t.get_ref('steps'), t.get_ref('evals_per_run'))
  t.lr = lr                          # peak learning rate, reached at the end of the warm-up
  t.warmup_fraction = 0.05           # warmup_steps derives from it (see above)
  t.warmup_steps = _derived(_fraction_of, t.get_ref('steps'), t.get_ref('warmup_fraction'))
  t.end_lr_fraction = 0.1            # cosine decay to lr * this, reached at the last step
  t.b1 = 0.9
  t.b2 = 0.95
  t.weight_decay = 0.05              # on weight matrices and conv kernels only, chosen by name
                                     # (mars_jax.train.engine.DECAYED_PARAM_NAMES)
  t.clip_norm = 2.0
  t.ema_decay = 0.0                  # 0 disables the parameter EMA
  t.compute_dtype = 'float32'        # 'bfloat16': bf16 compute, fp32 master weights
  t.xla_cpu_options = ''             # on a CPU, XLA options for the train step: 'name=value ...'
                                     # as in XLA_FLAGS without the dashes (config.xla_options)
  return t


# A FieldReference computes `op.fn(value, *op.args)` when read. Module-level functions (not
# FieldReference.to_int's lambda) keep a config holding these references picklable.
_Op = collections.namedtuple('_Op', ['fn', 'args'])


def _derived(fn, first, *rest):
  """An int field equal to fn(first, *rest), recomputed whenever a referenced field changes."""
  return mlc.FieldReference(first, field_type=int, op=_Op(fn, list(rest)))


def _ceil_div(a, b):
  return -(-int(a) // int(b)) if b > 0 else 0   # a count < 1 is reported by config.derive


def _fraction_of(steps, fraction):
  return int(round(steps * fraction))


# XLA's CPU option that hands the dots of a step to XNNPACK; see the tokenizer's train settings.
YNN_DOTS = 'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'


def get_config():
  c = mlc.ConfigDict()
  c.seed = 0

  # --- data ---------------------------------------------------------------
  c.data = mlc.ConfigDict()
  c.data.source = 'synthetic'        # 'synthetic' | 'nsynth' | 'folder' | 'soundfont'
  c.data.path = ''                   # nsynth: folder with nsynth-{train,valid,test}/;
                                     # folder: audio root;
                                     # soundfont: the .sf2/.sf3 ('' = a system GM SoundFont)
  c.data.labels_csv = ''             # folder source: CSV (file,pitch,instrument[,split]);
                                     # '' = <path>/labels.csv
  c.data.pitch_range = (21, 108)     # inclusive MIDI pitches kept
  c.data.instrument_sources = ()     # nsynth filter, e.g. ('acoustic',); () keeps all
  c.data.instrument_families = ()    # nsynth filter, e.g. ('brass', 'string'); () keeps all
  c.data.velocities = ()             # nsynth filter, e.g. (75, 100); () keeps all;
                                     # soundfont: velocities rendered (() = NSynth's 25..127)
  c.data.instrument_label = 'family'  # conditioning label: 'family' | 'instrument'
  c.data.storage_dtype = 'float16'   # dtype of the stored spectrograms
  c.data.examples_per_shard = 2048
  c.data.prepare_workers = 0         # processes for `prepare`; 0 = all cores
  c.data.loader_workers = 0          # grain worker processes; 0 = in-process
  c.data.silence_db = -60.0          # peak below this (dBFS) counts as silence and is skipped
  c.data.max_files = 0               # 0 = all; >0 caps each split (quick experiments)
  c.data.synthetic = mlc.ConfigDict()
  c.data.synthetic.families = ('bass', 'brass', 'flute', 'guitar', 'keyboard',
                               'mallet', 'organ', 'reed', 'string', 'vocal')
  c.data.synthetic.per_pitch_family = 2    # train notes per (pitch, family)
  c.data.synthetic.valid_fraction = 0.1
  c.data.synthetic.test_fraction = 0.1
  # data.source='soundfont': General MIDI programs rendered by FluidSynth
  # (mars_jax/data/soundfont.py)
  c.data.soundfont = mlc.ConfigDict()
  c.data.soundfont.families = ('bass', 'brass', 'flute', 'guitar', 'keyboard', 'mallet', 'organ',
                               'reed', 'string', 'synth_lead', 'vocal')   # NSynth's 11
  c.data.soundfont.programs_per_family = 0  # GM programs kept per family (seeded); 0 = all mapped
  c.data.soundfont.notes_per_pitch = 1      # velocities per (program, pitch), seeded pick; 0 = all
  c.data.soundfont.hold = 0.75              # key held for this fraction of the clip, then released
  c.data.soundfont.gain = 1.0               # FluidSynth synth.gain (its own default 0.2 is quiet)
  c.data.soundfont.valid_fraction = 0.1     # of each family's programs, held out (>= 1 of 3+)
  c.data.soundfont.test_fraction = 0.1

  # --- spectrogram front end ----------------------------------------------
  c.spectrogram = mlc.ConfigDict()
  c.spectrogram.sample_rate = 16000
  c.spectrogram.duration = 4.0       # seconds; sample_rate*duration must be a multiple of hop
  c.spectrogram.n_fft = 1024         # Nyquist bin dropped -> n_fft/2 frequency rows
  c.spectrogram.hop = 125            # last frame dropped -> samples/hop time columns
  c.spectrogram.log_eps = 1e-5       # value = log(magnitude + eps); magnitude 1 = full-scale sine
  c.spectrogram.log_max = 1.0        # log-magnitude mapped to [-1, 1] from [log(eps), log_max]
  c.spectrogram.griffin_lim_iters = 64
  c.spectrogram.griffin_lim_momentum = 0.99  # "fast Griffin-Lim"; 0 = classic

  # --- channel multiplexing -----------------------------------------------
  c.cmx = mlc.ConfigDict()
  c.cmx.mode = 'cmx'                 # 'cmx' | 'truncate' (lossy ablation) | 'none'
  c.cmx.factor = 8                   # r: every r x r block becomes r*r channels

  # --- tokenizer ----------------------------------------------------------
  c.tokenizer = mlc.ConfigDict()
  c.tokenizer.channels = 128
  c.tokenizer.channel_mult = (1, 2, 4)  # one down-sampling between consecutive entries
  c.tokenizer.num_res_blocks = 2
  c.tokenizer.groups = 32            # GroupNorm groups
  c.tokenizer.latent_channels = 32   # = code dimension
  c.tokenizer.codebook_size = 4096
  c.tokenizer.scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  c.tokenizer.lookup = 'l2'          # 'l2' | 'cosine'
  c.tokenizer.beta = 0.25            # commitment weight
  c.tokenizer.num_phi = 4            # phi convs shared across neighbouring scales
  c.tokenizer.phi_ratio = 0.5
  c.tokenizer.quant_dropout = 0.0    # ImageFolder quantizer dropout probability
  c.tokenizer.dead_code_reseed = True
  c.tokenizer.l1_weight = 1.0
  c.tokenizer.l2_weight = 1.0
  c.tokenizer.level_weight = 0.0     # > 0: errors on loud bins count more (models/tokenizer.py)
  c.tokenizer.vq_weight = 1.0
  c.tokenizer.gan_weight = 0.0       # 0 disables the hinge-GAN
  c.tokenizer.gan_start = 0
  c.tokenizer.disc_channels = 64     # patch discriminator width
  c.tokenizer.disc_layers = 0        # 0 = as many as the image allows (at most VQGAN's 3)
  c.tokenizer.train = _train(steps=100_000, batch_size=64, lr=2e-4)
  # On a CPU, XLA's YNN (XNNPACK) library fusions for dots only, in place of its default list:
  # the tiny tokenizer step 1.5x faster, the same losses to 3e-6 (BENCHMARKS.md, issue 14). Not
  # for the VAR, whose step it slowed (tiny) or left as it was (mid). An experimental XLA option
  # (tests/test_xla_options.py checks it still takes effect); '' turns it off.
  c.tokenizer.train.xla_cpu_options = YNN_DOTS

  # --- scale autoregressor ------------------------------------------------
  c.autoregressor = mlc.ConfigDict()
  c.autoregressor.depth = 16         # width 64*depth, heads = depth, MLP 4x
  c.autoregressor.width = 0          # 0 = 64 * depth
  c.autoregressor.heads = 0          # 0 = depth
  c.autoregressor.mlp_ratio = 4.0
  c.autoregressor.label_dropout = 0.1
  # Attention kernel: 'einsum' (reference, fastest on CPU), or jax.nn.dot_product_attention
  # with implementation 'xla' or 'cudnn' (fused: the only one that fits base's batch on one
  # GPU); 'auto' = cudnn on a GPU with bf16/fp16 compute, else einsum.
  c.autoregressor.attention = 'auto'
  c.autoregressor.gate_init = 0.0    # AdaLN gate init; 0 = VAR's by depth (1e-3 <= 20, 1e-4 <= 24)
  c.autoregressor.drop_path = -1.0   # stochastic depth at the last block; -1 = VAR's 0.1*depth/24
  # What each block keeps for the backward pass: 'none' (all), 'dots' (weight-matmul outputs;
  # attention scores, norms, GELU recomputed), 'full' (block inputs only; ~1/3 more compute).
  # Saved activations grow with depth x batch; large.py needs 'full' (see configs/large.py).
  c.autoregressor.remat = 'none'
  # The frozen tokenizer's tokens of the train split, encoded once at the start of the stage
  # instead of in every step (stages/token_table.py): 'auto' when the run reads the split at
  # least once (steps x batch >= examples), 'on', 'off'. Same targets either way.
  c.autoregressor.token_cache = 'auto'
  c.autoregressor.train = _train(steps=200_000, batch_size=256, lr=1e-4)

  # --- sampling -----------------------------------------------------------
  c.sample = mlc.ConfigDict()
  c.sample.num = 64
  c.sample.cfg = 3.0                 # guidance at the last scale; ramps linearly from 0
  c.sample.top_k = 600               # keep the k most likely codes; <= 0 (or >= vocabulary): off
  c.sample.top_p = 0.96              # then the smallest nucleus of mass >= p; <= 0 or >= 1: off
  c.sample.seed = 0
  c.sample.batch_size = 16
  c.sample.pitches = ()              # () = the whole pitch range
  c.sample.instruments = ()          # () = every instrument label

  # --- evaluation ---------------------------------------------------------
  c.evaluate = mlc.ConfigDict()
  c.evaluate.ndb_bins = 50           # k of NDB/k
  c.evaluate.kid_c = 16.0            # inverse multiquadratic kernel constant
  c.evaluate.alpha = 0.05            # NDB two-proportion z-test level
  c.evaluate.max_real = 10_000       # real examples used per split (0 = all)
  c.evaluate.report_grid = 8         # at most this many pitches x instruments in report.html
  c.evaluate.ceiling_notes = 96      # held-out notes through Griffin-Lim and the tokenizer (gl_*,
                                     # recon_*, real_pitch_*): standard error ~5 points at 96
  c.evaluate.report_triples = 2      # held-out notes a shown instrument gets in report.html
                                     # (original, Griffin-Lim, round trip; report_grid instruments)

  # Pitch and instrument classifiers the evaluation trains (their embeddings feed KID/FD).
  c.classifier = mlc.ConfigDict()
  c.classifier.widths = (32, 64, 128)
  c.classifier.train = _train(steps=5_000, batch_size=64, lr=1e-3)
  c.classifier.train.xla_cpu_options = YNN_DOTS   # 2-2.5x faster steps on a CPU (BENCHMARKS.md)

  # --- scale-out ----------------------------------------------------------
  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1                   # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.memory_budget_gib = 0.0     # per-device params + optimizer state budget; 0 = unchecked
  # logical axis name -> mesh axes (None = replicated); MaxText-style rules.
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('vocab', 'tensor'),
      ('conv_in', None),
      ('conv_out', 'fsdp'),
      ('codes', None),
  )
  return c
