"""The package's layers, read from its source: no import cycles, no upward imports, no private
names reached across modules. Every import counts, those inside functions too."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'mars_jax'
# Below the stages: may not import the stages, the Generator (mars_jax.sample), the CLI or the
# benchmarks.
LOWER = ('mars_jax.audio', 'mars_jax.data', 'mars_jax.models', 'mars_jax.train',
         'mars_jax.evaluate', 'mars_jax.config', 'mars_jax.fs', 'mars_jax.distributed',
         'mars_jax.defaults', 'mars_jax.progress', 'mars_jax.workdir', 'mars_jax.trained')
UPPER = ('mars_jax.stages', 'mars_jax.sample', 'mars_jax.main', 'mars_jax.bench')


def _name(path):
  parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob('*.py'))}


def _within(name, prefixes):
  return any(name == p or name.startswith(p + '.') for p in prefixes)


def scan(modules):
  """{module: set of mars_jax modules it imports}, [(module, 'other._private', line)]."""
  edges, private = {}, []
  for mod, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    aliases, out = {}, set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name.startswith('mars_jax'):
            out.add(a.name)
            if a.asname:
              aliases[a.asname] = a.name
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and (
          node.module or '').startswith('mars_jax'):
        for a in node.names:
          full = f'{node.module}.{a.name}'
          if full in modules:
            out.add(full)
            aliases[a.asname or a.name] = full
          else:
            out.add(node.module)
            if a.name.startswith('_') and node.module != mod:
              private.append((mod, full, node.lineno))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and aliases[node.value.id] != mod
          and node.attr.startswith('_') and not node.attr.startswith('__')):
        private.append((mod, f'{aliases[node.value.id]}.{node.attr}', node.lineno))
    edges[mod] = {m for m in out if m in modules and m != mod}
  return edges, private


def cycles(edges):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def upward(edges):
  return sorted((m, t) for m, ts in edges.items() if _within(m, LOWER)
                for t in ts if _within(t, UPPER))


EDGES, PRIVATE = scan(MODULES)


def test_the_walker_sees_the_package():
  assert 'mars_jax.stages.tokenizer' in EDGES and 'mars_jax.trained' in EDGES['mars_jax.sample']


def test_no_import_cycles():
  assert cycles(EDGES) == []


def test_no_upward_imports():
  assert upward(EDGES) == []


# bench.compare times an earlier commit's train step with that commit's own engine; commits from
# before engine.TrainStep built it from these private functions, and compare calls them only when
# the engine it imported has no TrainStep (an earlier commit's, never this one: checked below).
EARLIER_ENGINE = {('mars_jax.bench.compare', f'mars_jax.train.engine.{n}')
                  for n in ('_base_rng', '_init_fn', '_step_fn')}


def test_no_private_names_across_modules():
  assert [p for p in PRIVATE if p[:2] not in EARLIER_ENGINE] == []


def test_compare_takes_the_earlier_engine_path_only_without_train_step():
  import inspect
  from mars_jax.bench import compare
  from mars_jax.train import engine
  assert hasattr(engine, 'TrainStep')
  src = inspect.getsource(compare.compiled_step)
  guard = src.index("if hasattr(engine, 'TrainStep'):")
  assert all(src.index(f'engine.{full.rsplit(".", 1)[1]}') > src.index('return ts.init', guard)
             for _, full in EARLIER_ENGINE)


@pytest.mark.parametrize('source, want', [
    ({'mars_jax.a': 'from mars_jax import b\n', 'mars_jax.b': 'def f():\n  import mars_jax.a\n'},
     'cycle'),
    ({'mars_jax.data.x': 'def f():\n  from mars_jax.stages import y\n', 'mars_jax.stages.y': ''},
     'upward'),
    ({'mars_jax.a': 'from mars_jax import b\nb._hidden()\n', 'mars_jax.b': ''}, 'private'),
    ({'mars_jax.a': 'from mars_jax.b import _hidden\n', 'mars_jax.b': ''}, 'private'),
    ({'mars_jax.a': 'from mars_jax import b\nb.shown()\n', 'mars_jax.b': ''}, None),
])
def test_the_checks_can_fail(tmp_path, source, want):
  mods = {}
  for name, text in source.items():
    p = tmp_path / (name.replace('.', '_') + '.py')
    p.write_text(text)
    mods[name] = p
  edges, private = scan(mods)
  found = {'cycle': bool(cycles(edges)), 'upward': bool(upward(edges)), 'private': bool(private)}
  assert {k for k, v in found.items() if v} == ({want} if want else set())
