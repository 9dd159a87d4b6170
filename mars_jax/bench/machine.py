"""What every benchmark prints about where it ran: CPU, cores, JAX backend, date, load."""
import datetime
import os
import platform


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def load_average() -> str:
  try:
    return '/'.join(f'{v:.2f}' for v in os.getloadavg())
  except OSError:
    return 'n/a'


def describe(with_jax: bool = True) -> str:
  """One line for a benchmark's header, e.g. 'AMD EPYC, 2 cores; cpu: 1 x cpu; 2026-11-25; ...'."""
  parts = [f'{cpu_name()}, {os.cpu_count()} cores']
  if with_jax:
    import jax
    d = jax.devices()[0]
    parts.append(f'jax {jax.__version__} {d.platform}: {jax.device_count()} x '
                 f'{getattr(d, "device_kind", "?")}')
  parts += [str(datetime.date.today()), f'load average {load_average()}']
  return '; '.join(parts)
