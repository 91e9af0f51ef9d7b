"""One training process per workdir: WORKDIR/lock names its holder (host, pid, start time).

Two runs on one workdir would interleave metrics rows and let one's retention delete the other's
checkpoints. A lock whose pid is not alive on this host is stale (a killed run) and taken over; a
lock held on another host cannot be checked and is refused. On several hosts only process 0 takes
it (the others share its workdir).
"""

import datetime
import json
import os
import pathlib
import socket

from isdaa_jax.errors import UserError


class WorkdirLockedError(UserError):
  """Another live process trains in this workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, owned by another user
  return True


class WorkdirLock:
  """Context manager holding WORKDIR/lock for the run's lifetime."""

  def __init__(self, workdir, take: bool = True):
    self.path = pathlib.Path(workdir).absolute() / 'lock'
    self._take = take
    self._held = False

  def __enter__(self):
    if not self._take:
      return self
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is not None and (holder.get('host') != me['host']
                                   or _alive(int(holder.get('pid', -1)))):
          raise WorkdirLockedError(
              f'{self.path.parent} is in use by pid {holder.get("pid")} on '
              f'{holder.get("host")} (started {holder.get("started")}); wait for it, stop it, '
              f'or pass another --workdir (delete {self.path} if that process is gone)') from None
        self.path.unlink(missing_ok=True)  # stale: its process is gone
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self._held = True
      return self
    raise WorkdirLockedError(f'another process keeps taking {self.path}; pass another --workdir')

  def _holder(self):
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None  # unreadable or half written: treated as stale

  def __exit__(self, *exc):
    if self._held:
      self.path.unlink(missing_ok=True)
      self._held = False
    return False
