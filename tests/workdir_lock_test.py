"""One process per workdir: a live holder is refused in one sentence, a stale lock taken over."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from isdaa_jax import workdir_lock

_REPO = pathlib.Path(__file__).parents[1]


def _write_lock(workdir, pid, host=None):
  (workdir / 'lock').write_text(json.dumps(
      {'host': host or socket.gethostname(), 'pid': pid, 'started': '2026-12-02T14:00:00+00:00'}))


@pytest.fixture
def sleeper():
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
  yield proc.pid
  proc.kill()
  proc.wait()


def test_live_holder_is_refused_naming_it(tmp_path, sleeper):
  _write_lock(tmp_path, sleeper)
  with pytest.raises(workdir_lock.WorkdirLockedError) as info:
    with workdir_lock.WorkdirLock(tmp_path):
      pass
  message = str(info.value)
  assert '\n' not in message and f'pid {sleeper} on {socket.gethostname()}' in message
  assert json.loads((tmp_path / 'lock').read_text())['pid'] == sleeper  # left alone


def test_main_refuses_a_locked_workdir(tmp_path, sleeper):
  _write_lock(tmp_path, sleeper)
  res = subprocess.run(
      [sys.executable, '-m', 'isdaa_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.train.num_steps=1'],
      cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=300)
  assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1].startswith(
      f'error: {tmp_path} is in use by pid {sleeper}')
  assert not (tmp_path / 'config.json').exists() and not (tmp_path / 'checkpoints').exists()


def test_stale_lock_is_taken_over_and_released(tmp_path):
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()
  _write_lock(tmp_path, gone.pid)
  with workdir_lock.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
  assert not (tmp_path / 'lock').exists()


def test_other_host_lock_is_refused_and_non_zero_process_takes_none(tmp_path):
  _write_lock(tmp_path, 1, host='some-other-host')
  with pytest.raises(workdir_lock.WorkdirLockedError, match='on some-other-host'):
    with workdir_lock.WorkdirLock(tmp_path):
      pass
  with workdir_lock.WorkdirLock(tmp_path, take=False):  # process 1 of several
    pass
  assert json.loads((tmp_path / 'lock').read_text())['host'] == 'some-other-host'
