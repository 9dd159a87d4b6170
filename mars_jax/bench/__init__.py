"""Benchmarks (not tests): `python -m mars_jax.bench NAME [args]` runs
`mars_jax.bench.NAME.main(argv)`.

Each module prints a markdown table row plus the machine it ran on, for BENCHMARKS.md.
"""
import pkgutil


def available():
  """Names of the benchmark modules in this package (each has `main(argv)`)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))
