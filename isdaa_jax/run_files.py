"""What a run leaves in its workdir besides checkpoints and metrics: its config and data summary.

Both are written by process 0 only once the run is accepted (config validated, the workdir
locked, the checkpoints restored or found compatible), so a rejected run changes neither. A
resumed run with a different config (say a larger `train.num_steps`) keeps the earlier
config.json as config.<time it was written>.json: the workdir holds every config it trained under.
"""

import json
import pathlib
import time
from typing import Mapping

import jax

from isdaa_jax import atomic_file


def write_config(workdir, config_json: Mapping) -> pathlib.Path | None:
  """Writes WORKDIR/config.json; returns where a different earlier one was moved, if any."""
  if jax.process_index() != 0:
    return None
  path = pathlib.Path(workdir) / 'config.json'
  moved = None
  if path.exists():
    try:
      same = json.loads(path.read_text(encoding='utf-8')) == config_json
    except ValueError:  # unreadable: kept aside like any other earlier config
      same = False
    if same:
      return None
    stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime(path.stat().st_mtime))
    moved = path.with_name(f'config.{stamp}.json')
    n = 1
    while moved.exists():
      moved, n = path.with_name(f'config.{stamp}-{n}.json'), n + 1
    path.rename(moved)
  atomic_file.write_text(path, json.dumps(config_json, indent=2) + '\n')
  return moved


def write_data_summary(workdir, summary: Mapping):
  """WORKDIR/data_summary.json: rows read, kept, dropped and truncated per reason, per split."""
  if jax.process_index() == 0:
    atomic_file.write_text(pathlib.Path(workdir) / 'data_summary.json',
                           json.dumps(summary, indent=2) + '\n')
