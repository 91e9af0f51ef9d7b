"""Writing a file so that readers see the old one or the whole new one, never half of either.

  with atomic_file.replace(path) as f:    # 'w' text (utf-8) or mode='wb'
    f.write(...)

The content goes to a hidden temporary file in the same folder (a rename is atomic only within
one filesystem), is flushed to disk, and is renamed over `path` when the block ends without an
exception; on an exception (or a kill) `path` is left as it was and the temporary file removed.
"""

import contextlib
import os
import pathlib


@contextlib.contextmanager
def replace(path, mode: str = 'w'):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path, text: str):
  with replace(path) as f:
    f.write(text)
