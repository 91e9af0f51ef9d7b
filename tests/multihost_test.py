"""Two local JAX processes x 4 CPU devices train exactly like one process x 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from isdaa_jax.metrics_writer import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'isdaa_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.train.num_steps={STEPS}',
          '--config.checkpoint.every_steps=2', '--config.train.eval_every=2',
          '--config.train.progress_bar=False', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          '--config.mesh.tensor=2', *extra]


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = subprocess.run(_cmd(tmp_path / 'one'), cwd=REPO, env=_env(8), capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(tmp_path / 'two', '--config.distributed.initialize=on',
           f'--config.distributed.coordinator_address=127.0.0.1:{port}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
           '--config.distributed.cpu_collectives=gloo'),
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]

  def losses(d):
    return [(r['step'], r['loss']) for r in read_metrics(d) if 'loss' in r]

  one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1))
  for (_, a), (_, b) in zip(one, two):
    assert b == pytest.approx(a, rel=1e-5)
  evals = lambda d: [r['eval/loss'] for r in read_metrics(d) if 'eval/loss' in r]
  assert evals(tmp_path / 'two') == pytest.approx(evals(tmp_path / 'one'), rel=1e-5)
  # Both processes wrote one checkpoint together, and the gathered export is complete.
  assert (tmp_path / 'two' / 'checkpoints' / str(STEPS)).exists()
  assert (tmp_path / 'two' / 'hf' / 'model.safetensors').exists()
