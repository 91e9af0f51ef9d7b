"""Multi-host: when `jax.distributed.initialize` runs, and 2 processes x 4 devices == 1 x 8."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import tiny
from isdaa_jax import defaults
from isdaa_jax import distributed, train
from isdaa_jax.metrics_writer import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _dist(**kw):
  d = defaults.distributed_config()
  for k, v in kw.items():
    d[k] = v
  return d


def test_single_process_by_default_and_when_off():
  assert distributed.initialize_kwargs(_dist(), {}) is None
  assert distributed.initialize_kwargs(
      _dist(initialize='off'), {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}) is None
  # A one-task SLURM job is a single process.
  assert distributed.initialize_kwargs(_dist(), {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None


def test_self_describing_clusters_are_left_to_jax():
  assert distributed.initialize_kwargs(_dist(), {'TPU_WORKER_HOSTNAMES': 'a,b'}) == {}
  assert distributed.initialize_kwargs(_dist(), {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == {}
  assert distributed.initialize_kwargs(_dist(initialize='on'), {}) == {}


def test_coordinator_from_environment_and_config_overrides_it():
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '2'}
  assert distributed.initialize_kwargs(_dist(), env) == dict(
      coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2)
  cfg = _dist(coordinator_address='127.0.0.1:999', num_processes=2, process_id=0)
  # Loopback coordinators bind to loopback only.
  assert distributed.initialize_kwargs(cfg, env) == dict(
      coordinator_address='127.0.0.1:999', num_processes=2, process_id=0,
      coordinator_bind_address='127.0.0.1:999')
  # Without counts (SLURM with an explicit coordinator) JAX asks the cluster for them.
  assert distributed.initialize_kwargs(_dist(coordinator_address='gpu-07:24242'), {}) == dict(
      coordinator_address='gpu-07:24242')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# A 2x2x2 mesh: data, fsdp and tensor parallelism all cross the process boundary.
OVERRIDES = ('--config.train.num_steps=4', '--config.train.eval_every=2',
             '--config.checkpoint.every_steps=2', '--config.train.progress_bar=False',
             '--config.train.tensorboard=False', '--config.mesh.data=2', '--config.mesh.fsdp=2',
             '--config.mesh.tensor=2')


def _one_process_config():
  cfg = tiny.get_config()
  cfg.train.num_steps, cfg.train.eval_every, cfg.checkpoint.every_steps = 4, 2, 2
  cfg.train.progress_bar, cfg.train.tensorboard = False, False
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  return cfg


def _two_processes_and_one(tmp_path, extra=(), one_config=None):
  """Trains configs/tiny.py on a 2x2x2 mesh as 2 processes x 4 devices (`extra` overrides) while
  this process trains `one_config` (default: the same config) on its 8 devices; returns each
  run's metrics by step."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = []
  for pid in range(2):
    cmd = [sys.executable, '-m', 'isdaa_jax.main', '--config=configs/tiny.py',
           f'--workdir={tmp_path / "two"}', *OVERRIDES, *extra,
           f'--config.distributed.coordinator_address=127.0.0.1:{port}',
           '--config.distributed.initialize=on', '--config.distributed.num_processes=2',
           f'--config.distributed.process_id={pid}',
           '--config.distributed.cpu_collectives=gloo']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  # The 8-device baseline runs here (conftest gives this process 8 CPU devices) meanwhile.
  train.run(one_config or _one_process_config(), tmp_path / 'one')
  for p in procs:
    try:
      _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-3000:]

  def by_step(workdir):
    rows = {}
    for r in read_metrics(workdir):
      rows.setdefault(r['step'], {}).update(r)
    return rows

  return by_step(tmp_path / 'one'), by_step(tmp_path / 'two')


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  one, two = _two_processes_and_one(tmp_path)
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  assert one[4]['loss'] != one[1]['loss']  # it trained
  for step in one:
    for key in ('loss', 'grad_norm', 'rewards/margins', 'is/weight_mean', 'tokens'):
      assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)
  for step in (2, 4):
    assert two[step]['eval/loss'] == pytest.approx(one[step]['eval/loss'], rel=1e-4)
  # Each process saved its own data-iterator state next to the jointly written arrays.
  data_dir = tmp_path / 'two' / 'checkpoints' / '4' / 'data'
  assert sorted(p.name for p in data_dir.glob('process_*')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # The final export gathers the sharded params across both processes.
  a, b = (load_file(str(tmp_path / w / 'hf' / 'model.safetensors')) for w in ('one', 'two'))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_allclose(b[name].astype(np.float32), a[name].astype(np.float32),
                               rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_packed_shared_cached_two_processes_match_a_padded_in_step_reference(tmp_path):
  """Packing, prefix sharing, the cached reference and accumulation across processes train
  exactly what padded rows with the reference model in the step train."""
  one_config = _one_process_config()
  one_config.checkpoint.export_hf = False
  one, two = _two_processes_and_one(
      tmp_path, ('--config.data.packing=True', '--config.data.prefix_sharing=True',
                 '--config.train.reference=cached', '--config.optimizer.grad_accum_steps=2',
                 '--config.checkpoint.export_hf=False'), one_config)
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  for step in one:
    for key in ('loss', 'grad_norm', 'rewards/margins', 'is/weight_mean', 'logps/rejected'):
      assert two[step][key] == pytest.approx(one[step][key], rel=2e-4, abs=1e-5), (step, key)
  for step in (2, 4):
    assert two[step]['eval/loss'] == pytest.approx(one[step]['eval/loss'], rel=2e-4)
  # One cache per split, written once by process 0.
  assert sorted(p.name.split('-')[1] for p in (tmp_path / 'two' / 'reference_logps').iterdir()) \
      == ['eval.npz', 'train.npz']


@pytest.mark.slow
def test_preemption_notice_to_one_process_checkpoints_every_process_at_one_step(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'isdaa_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.train.num_steps=100000',
       '--config.checkpoint.every_steps=100000', '--config.train.eval_every=0',
       '--config.train.progress_bar=False', '--config.train.tensorboard=False',
       f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       '--config.distributed.num_processes=2', f'--config.distributed.process_id={pid}',
       '--config.distributed.cpu_collectives=gloo'],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for pid in range(2)]
  try:
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(tmp_path)) < 3:
      assert all(p.poll() is None for p in procs), 'a process exited before training'
      time.sleep(0.5)
    assert len(read_metrics(tmp_path)) >= 3, 'training did not start'
    # A TPU maintenance event may notify only some hosts: here just process 1.
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  saved = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 100000, saved
  assert max(r['step'] for r in read_metrics(tmp_path)) == saved[0]
  data_dir = tmp_path / 'checkpoints' / str(saved[0]) / 'data'
  assert sorted(p.name for p in data_dir.glob('process_*')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
