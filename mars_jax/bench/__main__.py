"""Dispatch: `python -m mars_jax.bench NAME [args]` -> mars_jax.bench.NAME.main(args)."""
import importlib
import sys

from mars_jax import allocator, bench


def main(argv):
  names = bench.available()
  if not argv or argv[0] in ('-h', '--help'):
    print('usage: python -m mars_jax.bench NAME [args]\navailable: ' + ', '.join(names))
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in names:
    print(f'unknown benchmark {name!r}; available: {", ".join(names)}', file=sys.stderr)
    return 2
  return importlib.import_module(f'mars_jax.bench.{name}').main(rest) or 0


if __name__ == '__main__':
  allocator.reexec_with_huge_pages()   # as the CLI runs: see mars_jax/allocator.py
  sys.exit(main(sys.argv[1:]))
