"""Training metrics as JSON lines and TensorBoard event files in the workdir (process 0 only)."""

import json
import math
import pathlib
from typing import Mapping

import jax

from isdaa_jax import atomic_file


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to WORKDIR/metrics.jsonl; scalars to TensorBoard."""

  def __init__(self, workdir, tensorboard: bool):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if self._active and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

  def drop_after(self, step: int):
    """Drops rows past `step`, the step a run resumed from, so each step appears once.

    A run stopped after its last checkpoint (a crash, a corrupt checkpoint) logged steps that
    the resumed run logs again. Rewritten to a temp file and renamed: a kill leaves either file.
    """
    if not self._active or not self._path.exists():
      return
    lines = self._path.read_text().splitlines(keepends=True)
    kept = [l for l in lines if l.strip() and _step(l) <= step]
    if len(kept) == len(lines):
      return
    atomic_file.write_text(self._path, ''.join(l if l.endswith('\n') else l + '\n' for l in kept))

  def write(self, step: int, scalars: Mapping[str, float], tensorboard: bool = True):
    if not self._active:
      return
    row = {'step': int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/Inf
    with open(self._path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None and tensorboard:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _step(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return math.inf  # a half-written last line: dropped with the rows after the checkpoint


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
