"""Config validation: every inconsistency fails before any work, naming the field."""
import pytest

from mars_jax import config as config_lib
from tests.helpers import load_config


@pytest.mark.parametrize('name,image,latent,tokens', [
    ('tiny', (16, 16, 64), (8, 8, 16), 85),
    ('base', (64, 64, 64), (16, 16, 32), 680),
    ('large', (64, 64, 64), (16, 16, 32), 680),
])
def test_shipped_configs_derive(name, image, latent, tokens):
  s = config_lib.derive(load_config(name))
  assert s.image == image and s.latent == latent and s.num_tokens == tokens


def test_nsynth_default_is_512_square():
  s = config_lib.derive(load_config('base'))
  assert (s.n_samples, s.freq_bins, s.frames) == (64000, 512, 512)


@pytest.mark.parametrize('field,value,needle', [
    ('spectrogram.hop', 100, 'spectrogram.hop=100'),
    ('spectrogram.duration', 1.00001, 'spectrogram.duration'),
    ('spectrogram.n_fft', 255, 'spectrogram.n_fft'),
    ('cmx.factor', 3, 'cmx.factor=3'),
    ('cmx.mode', 'zip', 'cmx.mode'),
    ('tokenizer.scales', (1, 2, 4, 16), 'larger than the 8 x 8 latent'),
    ('tokenizer.scales', (1, 2, 4), 'must end at the latent side 8'),
    ('tokenizer.scales', (2, 1, 8), 'strictly increasing'),
    ('tokenizer.channel_mult', (1, 2, 2, 2, 2, 2, 2), 'tokenizer.channel_mult'),
    ('tokenizer.groups', 7, 'tokenizer.groups=7'),
    ('tokenizer.level_weight', -1.0, 'tokenizer.level_weight=-1.0'),
    ('data.pitch_range', (80, 60), 'data.pitch_range'),
    ('data.source', 'mp3s', 'data.source'),
    ('tokenizer.train.steps', 0, 'tokenizer.train.steps=0'),
    ('autoregressor.remat', 'dots_saveable', "autoregressor.remat='dots_saveable'"),
])
def test_bad_field_is_named(field, value, needle):
  c = load_config('tiny')
  section, *rest = field.split('.')
  target = c[section]
  for k in rest[:-1]:
    target = target[k]
  target[rest[-1]] = value
  with pytest.raises(config_lib.ConfigError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    config_lib.derive(c)


def test_hop_error_offers_valid_hops():
  c = load_config('tiny')
  c.spectrogram.hop = 100
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.derive(c)
  suggested = [int(v) for v in str(e.value).split('[')[1].rstrip('.]').split(',')]
  assert all(8192 % h == 0 for h in suggested)


def test_mesh_resolution_and_errors():
  c = load_config('tiny')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 2
  assert config_lib.mesh_shape(c, 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  c.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match='8 devices'):
    config_lib.mesh_shape(c, 8)
  c.mesh.data, c.mesh.fsdp = -1, 3
  with pytest.raises(config_lib.ConfigError, match='mesh.data'):
    config_lib.mesh_shape(c, 8)


def test_batch_must_split_over_data_parallel_axes():
  c = load_config('tiny')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
  c.tokenizer.train.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r'tokenizer.train.batch_size=12.*use e.g. 8'):
    config_lib.validate_batch(c, 'tokenizer', 8)
  c.tokenizer.train.batch_size = 16
  assert config_lib.validate_batch(c, 'tokenizer', 8)['fsdp'] == 4


def test_fingerprint_tracks_only_named_sections():
  a, b = load_config('tiny'), load_config('tiny')
  b.tokenizer.train.steps += 1
  fp = lambda c: config_lib.fingerprint(c, 'data', 'spectrogram')
  assert fp(a) == fp(b)
  b.spectrogram.hop = 32
  assert fp(a) != fp(b)


def test_fingerprint_exclude_ignores_only_the_named_field():
  a, b = load_config('tiny'), load_config('tiny')
  b.data.prepare_workers = 7
  assert config_lib.fingerprint(a, 'data') != config_lib.fingerprint(b, 'data')
  assert (config_lib.fingerprint(a, 'data', exclude=('data.prepare_workers',))
          == config_lib.fingerprint(b, 'data', exclude=('data.prepare_workers',)))
  b.data.max_files = 3
  assert (config_lib.fingerprint(a, 'data', exclude=('data.prepare_workers',))
          != config_lib.fingerprint(b, 'data', exclude=('data.prepare_workers',)))
