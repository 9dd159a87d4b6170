"""Workdir files on a local disk or in an object store (gs://, s3://), through etils.epath.

A TPU pod writes its workdir to a bucket (`--workdir=gs://bucket/run`): every worker sees it and it
outlives the VMs. Object stores have no rename and no append, so what the pipeline writes goes
through three calls here that do the right thing on both:
  write_bytes / write_text  a whole file at once: locally a temp file renamed into place (atomic),
                            remotely one object upload (atomic by itself);
  AppendLog                 a growing text/bytes log (metrics.jsonl, TensorBoard events): appended
                            locally; remotely kept in memory and re-uploaded whole, at most every
                            `remote_every_s` seconds and on flush(force=True).
Orbax checkpoints (tensorstore) and ArrayRecord shards (array_record >= 0.8) open gs:// natively;
everything else reaches gs:// through epath's fsspec backend, i.e. gcsfs (`pip install -e .[gcs]`),
checked once by `check_workdir` before anything runs.
"""
import io
import os
import time
import uuid

from etils import epath

REMOTE_SCHEMES = ('gs://', 's3://')


def is_remote(path) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def path(p) -> epath.Path:
  return epath.Path(p)


def absolute(p) -> str:
  """An absolute path string: local paths made absolute, remote URIs unchanged (os.path would
  turn gs://b/x into <cwd>/gs:/b/x)."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def join(*parts) -> str:
  """os.path.join that keeps a URI's double slash (gs://b + x -> gs://b/x)."""
  return os.fspath(epath.Path(*parts))


class WorkdirError(RuntimeError):
  """The workdir cannot be used (missing file-system package, no access); the message says why."""


def check_workdir(workdir) -> None:
  """Fails early, naming what to install, when a remote workdir's file system is missing (and
  touches the bucket once, so bad credentials fail here rather than after compiling)."""
  if not is_remote(workdir):
    return
  try:
    epath.Path(workdir).exists()
  except ImportError as e:
    need = 'gcsfs: pip install -e ".[gcs]"' if os.fspath(workdir).startswith('gs://') else 's3fs'
    raise WorkdirError(f'--workdir={workdir} is in an object store, which needs {need} '
                       f'(or give a local folder, e.g. a gcsfuse mount).') from e
  except Exception as e:  # DNS, credentials, permissions: say so before anything compiles
    raise WorkdirError(f'cannot reach --workdir={workdir}: {type(e).__name__}: {e}. Check the '
                       f'network and the credentials (gcloud auth application-default login; '
                       f'on a TPU VM, the service account needs access to the bucket).') from e


def makedirs(p) -> epath.Path:
  out = epath.Path(p)
  out.mkdir(parents=True, exist_ok=True)
  return out


def exists(p) -> bool:
  return epath.Path(p).exists()


def read_text(p) -> str:
  return epath.Path(p).read_text()


def read_bytes(p) -> bytes:
  return epath.Path(p).read_bytes()


def write_bytes(p, data: bytes) -> None:
  """Writes the whole file so that readers see the old file or the new one, never a part."""
  p = epath.Path(p)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = os.path.join(os.fspath(p.parent), f'.{p.name}.tmp-{uuid.uuid4().hex[:8]}')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def upload(local_path: str, dst) -> None:
  """Copies a finished local file to `dst` (a remote object, or renamed into place locally)."""
  dst = epath.Path(dst)
  if not is_remote(dst):
    os.replace(local_path, dst)
    return
  with open(local_path, 'rb') as src, dst.open('wb') as out:
    while chunk := src.read(16 << 20):
      out.write(chunk)
  os.remove(local_path)


def wav_bytes(wave, sample_rate: int, subtype: str = 'PCM_16') -> bytes:
  """A WAV file in memory, so it can be written to any workdir with write_bytes."""
  import soundfile as sf
  buf = io.BytesIO()
  sf.write(buf, wave, int(sample_rate), subtype=subtype, format='WAV')
  return buf.getvalue()


class AppendLog:
  """A file that only grows: appended in place locally, re-uploaded whole remotely.

  `binary` picks bytes or str records. Remote uploads happen at most every `remote_every_s`
  seconds unless flush(force=True) (checkpoint time, close), so a run killed between uploads
  loses at most that many seconds of log lines, never a checkpointed step's. The first flush
  always uploads (a new run's first metrics appear at once, whatever the machine's uptime).
  `clock` (seconds, monotonic) is injectable for tests.
  """

  def __init__(self, p, binary: bool = False, remote_every_s: float = 30.0, clock=None):
    self.path, self.binary = epath.Path(p), binary
    self.remote, self.every = is_remote(self.path), remote_every_s
    self._clock = clock or time.monotonic
    # _last None: nothing uploaded yet by this log, so the first flush is never held back.
    self._f, self._buf, self._last, self._dirty = None, None, None, False
    if self.remote:
      empty = b'' if binary else ''
      if self.path.exists():
        self._buf = [self.path.read_bytes() if binary else self.path.read_text()]
      else:
        self._buf = [empty]
    else:
      self._f = open(self.path, 'ab' if binary else 'a')

  def write(self, data) -> None:
    if self.remote:
      self._buf.append(data)
      self._dirty = True
    else:
      self._f.write(data)

  def flush(self, force: bool = False) -> None:
    if not self.remote:
      self._f.flush()
    elif self._dirty and (force or self._last is None
                          or self._clock() - self._last >= self.every):
      joined = (b'' if self.binary else '').join(self._buf)
      self._buf = [joined]
      self.path.write_bytes(joined if self.binary else joined.encode('utf-8'))
      self._last, self._dirty = self._clock(), False

  def close(self) -> None:
    self.flush(force=True)
    if self._f is not None:
      self._f.close()
