"""Builds every notebook in notebooks/ from its Python source, with outputs cleared.

Each `notebooks/<name>.py` (this file excepted) is the reviewable source of `<name>.ipynb`, in the
"percent" cell format that Jupytext and VS Code read: `# %%` starts a code cell, `# %% [markdown]`
a markdown cell whose lines are `# `-commented. The sources also run as plain scripts.

  python notebooks/build_notebooks.py           # write every .ipynb
  python notebooks/build_notebooks.py --check   # exit 1 if a stored .ipynb differs from its source
"""

import argparse
import pathlib
import re
import sys

import nbformat

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
_MARKER = re.compile(r'^# %%(?P<markdown> \[markdown\])?\s*$')


class NotebookSourceError(ValueError):
  """A notebook source file that is not in the percent cell format."""


def sources(directory: pathlib.Path = NOTEBOOK_DIR) -> list[pathlib.Path]:
  """The notebook sources in `directory`, sorted."""
  return sorted(p for p in directory.glob('*.py') if p.name != pathlib.Path(__file__).name)


def _split_cells(text: str, path: pathlib.Path) -> list[tuple[str, str]]:
  cells, kind, lines = [], None, []
  for number, line in enumerate(text.splitlines(), start=1):
    match = _MARKER.match(line)
    if match:
      if kind is not None:
        cells.append((kind, lines))
      kind, lines = ('markdown' if match['markdown'] else 'code'), []
    elif kind is None:
      if line.strip():
        raise NotebookSourceError(
            f'{path}:{number}: text before the first "# %%" marker; start the file with a cell.')
    elif kind == 'markdown':
      if line and line != '#' and not line.startswith('# '):
        raise NotebookSourceError(
            f'{path}:{number}: every line of a markdown cell must start with "# ".')
      lines.append(line[2:])
    else:
      lines.append(line)
  if kind is not None:
    cells.append((kind, lines))
  return [(kind, '\n'.join(lines).strip('\n')) for kind, lines in cells]


def build(path: pathlib.Path) -> nbformat.NotebookNode:
  """The notebook for one percent-format source file, outputs cleared, deterministic cell ids."""
  cells = _split_cells(path.read_text(), path)
  if not cells:
    raise NotebookSourceError(f'{path} holds no "# %%" cell; add at least one.')
  notebook = nbformat.v4.new_notebook()
  notebook.metadata = {
      'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
      'language_info': {'name': 'python'},
  }
  for index, (kind, source) in enumerate(cells):
    make = nbformat.v4.new_markdown_cell if kind == 'markdown' else nbformat.v4.new_code_cell
    # Random ids (nbformat's default) would make every rebuild a diff.
    notebook.cells.append(make(source, id=f'{path.stem}-{index:02d}'))
  nbformat.validate(notebook)
  return notebook


def render(path: pathlib.Path) -> str:
  return nbformat.writes(build(path)) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true',
                      help='compare instead of writing; exit 1 when a notebook is stale')
  args = parser.parse_args(argv)
  stale = []
  for source in sources():
    target = source.with_suffix('.ipynb')
    text = render(source)
    if args.check:
      if not target.is_file() or target.read_text() != text:
        stale.append(target.name)
    else:
      target.write_text(text)
      print(f'wrote {target.relative_to(NOTEBOOK_DIR.parent)}')
  if stale:
    print(f'stale notebooks: {", ".join(stale)}; run python notebooks/build_notebooks.py',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
