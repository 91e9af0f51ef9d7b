"""Training metrics as JSON lines and TensorBoard event files in the workdir (process 0 only)."""

import json
import math
import pathlib
from typing import Mapping

import jax


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to WORKDIR/metrics.jsonl; scalars to TensorBoard."""

  def __init__(self, workdir, tensorboard: bool):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if self._active and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

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


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
