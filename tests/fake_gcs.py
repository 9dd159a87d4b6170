"""A stand-in for Google Cloud Storage, so tests can run a workdir at gs://bucket/... offline.

`gs://bucket/key` is the file ROOT/bucket/key. Like GCS it has no append and no rename, so code
that appends to or renames a workdir file fails here as it would on a bucket. fsspec routes
gs:// to it (epath's fsspec backend -> this class); the two native readers of gs:// (orbax's
tensorstore and ArrayRecord) cannot be redirected, so `use(root, monkeypatch)` points mars_jax's
two seams for them (checkpoint._orbax_path, pipeline._array_records) at the same local files and
records the URIs they were given.
"""
import os
import shutil

import fsspec

PROTOCOLS = ('gs', 'gcs')


def _key(path) -> str:
  path = os.fspath(path)
  for p in PROTOCOLS:
    if path.startswith(p + '://'):
      path = path[len(p) + 3:]
  return path.strip('/')


class FakeGCS(fsspec.AbstractFileSystem):
  protocol = PROTOCOLS
  root = None          # set by use()
  cachable = False

  def __init__(self, *args, **storage_options):   # epath passes finalize_on_close=True
    super().__init__()

  @classmethod
  def _strip_protocol(cls, path):
    return _key(path)

  def local(self, path) -> str:
    if FakeGCS.root is None:
      raise RuntimeError('fake_gcs.use() was not called')
    return os.path.join(FakeGCS.root, _key(path))

  def info(self, path, **kwargs):
    p = self.local(path)
    if os.path.isdir(p):
      return {'name': _key(path), 'size': 0, 'type': 'directory'}
    if os.path.isfile(p):
      return {'name': _key(path), 'size': os.path.getsize(p), 'type': 'file'}
    raise FileNotFoundError(f'gs://{_key(path)}')

  def ls(self, path, detail=True, **kwargs):
    p = self.local(path)
    if not os.path.isdir(p):
      return [self.info(path)] if detail else [_key(path)]
    out = [self.info(f'{_key(path)}/{n}') for n in sorted(os.listdir(p))]
    return out if detail else [o['name'] for o in out]

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode or '+' in mode:
      raise NotImplementedError(f'GCS objects cannot be appended to or updated: gs://{_key(path)}')
    if 'w' in mode:
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
    return open(self.local(path), mode)

  def makedirs(self, path, exist_ok=False):
    os.makedirs(self.local(path), exist_ok=True)   # GCS has no folders: never an error

  def mkdir(self, path, create_parents=True, **kwargs):
    os.makedirs(self.local(path), exist_ok=True)

  def rm(self, path, recursive=False, maxdepth=None):
    p = self.local(path)
    if os.path.isdir(p):
      if not recursive:
        raise IsADirectoryError(p)
      shutil.rmtree(p)
    else:
      os.remove(p)

  def rm_file(self, path):
    os.remove(self.local(path))

  def rmdir(self, path):
    os.rmdir(self.local(path))

  def mv(self, *args, **kwargs):
    raise NotImplementedError('GCS has no rename: write the object whole instead')

  rename = mv


def use(root, monkeypatch):
  """Routes gs:// to ROOT until `monkeypatch` is undone; returns {'orbax': [...],
  'array_record': [...]}: the gs:// URIs that reached the native readers' seams."""
  from etils.epath import backend
  from mars_jax.data import pipeline
  from mars_jax.train import checkpoint
  monkeypatch.setattr(FakeGCS, 'root', str(root))
  real = backend.fsspec_backend._get_filesystem
  monkeypatch.setattr(backend.fsspec_backend, '_get_filesystem',
                      lambda name: FakeGCS() if name in PROTOCOLS else real(name))
  seen = {'orbax': [], 'array_record': []}
  fake = FakeGCS()

  def to_local(kind, p):
    p = os.fspath(p)
    if p.startswith('gs://'):
      seen[kind].append(p)
      return fake.local(p)
    return p

  orbax_path, array_records = checkpoint._orbax_path, pipeline._array_records
  monkeypatch.setattr(checkpoint, '_orbax_path', lambda d: orbax_path(to_local('orbax', d)))
  monkeypatch.setattr(pipeline, '_array_records',
                      lambda paths: array_records([to_local('array_record', p) for p in paths]))
  return seen
