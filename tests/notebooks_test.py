"""Every notebook in notebooks/ matches its source, is stored with outputs cleared, and runs.

The notebooks run in fast mode (ISDAA_NOTEBOOK_FAST=1) on the `python3` kernel through nbclient, so
a change in the library that breaks a notebook (or one of the properties it asserts) fails here.
The lab notebooks share one lab folder (ISDAA_LAB_DIR): the first of them to run fills it with the
lab's smoke grid, the others read it.
"""

import importlib.util
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / 'notebooks'
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob('*.ipynb'))
EXPECTED = ('loss_landscape.ipynb', 'loss_surface.ipynb', 'overoptimization.ipynb')


def _load_builder():
  spec = importlib.util.spec_from_file_location('build_notebooks',
                                                NOTEBOOK_DIR / 'build_notebooks.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


builder = _load_builder()


def stored_output_problems(notebook) -> list[str]:
  """What keeps a notebook from being 'stored with outputs cleared'."""
  problems = []
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type != 'code':
      continue
    if cell.outputs:
      problems.append(f'cell {index} has {len(cell.outputs)} outputs')
    if cell.execution_count is not None:
      problems.append(f'cell {index} has execution_count {cell.execution_count}')
  if 'widgets' in notebook.metadata:
    problems.append('notebook metadata holds widget state')
  return problems


def execute(path: pathlib.Path, monkeypatch):
  """Runs a notebook in fast mode from its own folder and returns it with outputs."""
  monkeypatch.setenv('ISDAA_NOTEBOOK_FAST', '1')
  # Figures must come back as outputs even where the environment picks a headless backend.
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, kernel_name='python3', timeout=300,
                                   resources={'metadata': {'path': str(path.parent)}})
  client.execute()
  return notebook


def test_expected_notebooks_exist_and_match_their_sources(capsys):
  names = [p.name for p in NOTEBOOKS]
  for name in EXPECTED:
    assert name in names
  sources = {p.with_suffix('.ipynb').name for p in builder.sources()}
  assert sources == set(names), 'every notebook is built from a notebooks/<name>.py source'
  assert builder.main(['--check']) == 0, capsys.readouterr().err


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_stored_with_outputs_cleared(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  assert stored_output_problems(notebook) == []
  assert notebook.metadata.kernelspec.name == 'python3'


@pytest.fixture(scope='session')
def lab_dir(tmp_path_factory):
  """An empty folder for the lab notebooks: the first one runs the smoke lab into it."""
  return tmp_path_factory.mktemp('lab')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_runs_in_fast_mode(path, monkeypatch, lab_dir):
  monkeypatch.setenv('ISDAA_LAB_DIR', str(lab_dir))
  notebook = execute(path, monkeypatch)
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert figures, 'a notebook that draws nothing has lost its plots'
  # Running it must not have touched the stored copy.
  assert stored_output_problems(nbformat.read(path, as_version=4)) == []


def test_harness_detects_a_failing_cell_and_stored_outputs(tmp_path, monkeypatch):
  source = tmp_path / 'broken.py'
  source.write_text("# %% [markdown]\n# # Broken\n\n# %%\nx = 1\nx\n\n# %%\nraise RuntimeError('boom')\n")
  path = tmp_path / 'broken.ipynb'
  path.write_text(builder.render(source))
  assert stored_output_problems(nbformat.read(path, as_version=4)) == []
  with pytest.raises(nbclient.exceptions.CellExecutionError, match='boom'):
    execute(path, monkeypatch)
  notebook = nbformat.read(path, as_version=4)
  notebook.cells[1].outputs = [nbformat.v4.new_output('stream', text='1\n')]
  notebook.cells[1].execution_count = 1
  assert stored_output_problems(notebook) == ['cell 1 has 1 outputs', 'cell 1 has execution_count 1']


def test_builder_splits_percent_cells(tmp_path):
  source = tmp_path / 'demo.py'
  source.write_text('# %% [markdown]\n# # Title\n#\n# text `x`\n\n# %%\nimport os\n\n\n'
                    'def f():\n  return os.sep\n\n# %%\nf()\n')
  notebook = builder.build(source)
  assert [c.cell_type for c in notebook.cells] == ['markdown', 'code', 'code']
  assert notebook.cells[0].source == '# Title\n\ntext `x`'
  assert notebook.cells[1].source == 'import os\n\n\ndef f():\n  return os.sep'
  assert [c.id for c in notebook.cells] == ['demo-00', 'demo-01', 'demo-02']
  assert builder.render(source) == builder.render(source)  # deterministic: no random ids


@pytest.mark.parametrize('text, message', [
    ('import os\n# %%\nx = 1\n', 'before the first'),
    ('# %% [markdown]\nnot a comment\n', 'must start with'),
    ('\n\n', 'no "# %%" cell'),
])
def test_builder_rejects_malformed_sources(tmp_path, text, message):
  source = tmp_path / 'bad.py'
  source.write_text(text)
  with pytest.raises(builder.NotebookSourceError, match=message):
    builder.build(source)
