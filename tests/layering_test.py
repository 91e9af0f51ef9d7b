"""The package's layers, read from the source: every import (also those inside functions) of
every module is checked, so a shortcut taken in a hurry fails here rather than in review."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'isdaa_jax'


def _imports(path: pathlib.Path, root: pathlib.Path = REPO) -> set[str]:
  """Absolute module names `path` imports (relative imports resolved against its package)."""
  tree = ast.parse(path.read_text(), str(path))
  here = '.'.join(path.relative_to(root).with_suffix('').parts)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = here.split('.')[:-node.level]
        base = '.'.join(parent + ([base] if base else []))
      names.add(base)
      names.update(f'{base}.{a.name}' for a in node.names)
  return names


def _modules(folder: pathlib.Path):
  return sorted(folder.rglob('*.py'))


def _repo_python_files():
  skip = {'.git', '.venv', 'build'}
  return [p for p in REPO.rglob('*.py') if not skip & set(p.relative_to(REPO).parts)]


def test_imports_helper_sees_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / 'isdaa_jax' / 'data'
  pkg.mkdir(parents=True)
  f = pkg / 'x.py'
  f.write_text('def f():\n  from isdaa_jax.model import gguf\n  from ..model import hf\n')
  assert {'isdaa_jax.model.gguf', 'isdaa_jax.model.hf'} <= _imports(f, tmp_path)


@pytest.mark.parametrize('path', _modules(PACKAGE / 'data'), ids=lambda p: p.name)
def test_data_imports_nothing_from_model(path):
  bad = sorted(n for n in _imports(path) if n == 'isdaa_jax.model' or
               n.startswith('isdaa_jax.model.'))
  assert not bad, f'{path.relative_to(REPO)} imports {bad}: data/ sits below model/'


def test_model_and_data_import_no_entry_point():
  entry = {'isdaa_jax.main', 'isdaa_jax.train', 'isdaa_jax.score', 'isdaa_jax.evaluate',
           'isdaa_jax.plan', 'isdaa_jax.lab'}
  for path in _modules(PACKAGE / 'model') + _modules(PACKAGE / 'data'):
    bad = sorted(n for n in _imports(path) if any(n == e or n.startswith(e + '.') for e in entry))
    assert not bad, f'{path.relative_to(REPO)} imports {bad}'


def test_library_never_imports_torch():
  for path in _modules(PACKAGE):
    bad = sorted(n for n in _imports(path) if n.split('.')[0] in ('torch', 'peft', 'trl'))
    assert not bad, f'{path.relative_to(REPO)} imports {bad}'


def test_nothing_inserts_into_sys_path():
  for path in _repo_python_files():
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr in ('insert', 'append') and (
          isinstance(node.value, ast.Attribute) and node.value.attr == 'path'
          and isinstance(node.value.value, ast.Name) and node.value.value.id == 'sys'):
        pytest.fail(f'{path.relative_to(REPO)}:{node.lineno} changes sys.path')
