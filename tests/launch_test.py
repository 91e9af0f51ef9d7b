"""The launch scripts, run with bash against recording stand-ins for gcloud, srun and python.

Each script's --dry-run output is parsed as shell words and compared with what the same script
really executes (the stand-ins record their argv), so what a dry run shows is what runs. Remote
and per-task command strings are executed by bash too, so their quoting is checked end to end.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = 'launch/tpu_vm.sh'
SLURM = 'launch/slurm_gpu.sbatch'
GPU = 'launch/gpu_single_host.sh'
# Overrides whose quoting a launcher could break: spaces, parentheses, a single quote, a '$'.
OVERRIDES = ['--config.data.length_buckets=(64, 128)', "--config.data.path=/data/it's here.jsonl",
             '--config.model.path=$HOME/not-expanded', '--config.loss.name=ipo']
TPU_ENV = dict(TPU_NAME='my-tpu', ZONE='us-central2-b', PROJECT='my-project',
               ACCELERATOR_TYPE='v4-32', CONFIG='configs/tiny.py', BUCKET='gs://my-bucket/runs')
SLURM_ENV = dict(SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='gpu-[07-08]', SLURM_NNODES='2',
                 CONFIG='configs/tiny.py', WORKDIR='/shared/my runs/hh')

_RECORDER = """#!/bin/sh
exec {python} -c 'import json, os, sys
with open(os.environ["CALLS"], "a") as f:
  f.write(json.dumps(dict(name=sys.argv[1], argv=sys.argv[2:], cwd=os.getcwd(),
                          env=dict(os.environ))) + "\\n")' {name} "$@"
"""


class Shell:
  """Runs launch scripts with a private HOME/TMPDIR and recording stand-ins first on PATH."""

  def __init__(self, tmp_path: pathlib.Path):
    self.tmp = tmp_path
    self.bin = tmp_path / 'bin'
    self.home = tmp_path / 'home'
    self.calls_file = tmp_path / 'calls.jsonl'
    self.bin.mkdir()
    self.home.mkdir()
    for name in ('gcloud', 'srun', 'python3'):
      self.fake(self.bin / name)
    (self.bin / 'scontrol').write_text('#!/bin/sh\nprintf "gpu-07\\ngpu-08\\n"\n')
    (self.bin / 'scontrol').chmod(0o755)

  def fake(self, path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_RECORDER.format(python=sys.executable, name=path.name))
    path.chmod(0o755)

  def env(self, **extra):
    return {'PATH': f'{self.bin}:{os.environ["PATH"]}', 'HOME': str(self.home),
            'TMPDIR': str(self.tmp), 'CALLS': str(self.calls_file), **extra}

  def run(self, script, *args, env=None, cwd=ROOT):
    return subprocess.run(['bash', str(ROOT / script), *args], cwd=cwd, env=self.env(**(env or {})),
                          capture_output=True, text=True, timeout=60)

  def bash(self, command, env=None, cwd=None):
    return subprocess.run(['bash', '-c', command], cwd=cwd, env=self.env(**(env or {})),
                          capture_output=True, text=True, timeout=60)

  def calls(self):
    if not self.calls_file.exists():
      return []
    return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

  def wait_for_calls(self, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while len(self.calls()) < count and time.monotonic() < deadline:
      time.sleep(0.05)
    return self.calls()


@pytest.fixture
def sh(tmp_path):
  return Shell(tmp_path)


def dry_run(sh, script, *args, env=None):
  """The commands a dry run prints, each split into shell words."""
  before = len(sh.calls())
  result = sh.run(script, '--dry-run', *args, env=env)
  assert result.returncode == 0, result.stderr
  assert len(sh.calls()) == before, 'a dry run must not run anything'
  return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(argv):
  [command] = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):]


# ---------------------------------------------------------------------------------------------
# TPU VM


def test_tpu_train_runs_main_on_all_workers_with_overrides_intact(sh):
  [argv] = dry_run(sh, TPU, 'train', *OVERRIDES, env=TPU_ENV)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert {'--zone=us-central2-b', '--project=my-project', '--worker=all'} <= set(argv)
  remote = remote_command(argv)

  # Run the remote command as a worker's shell would, with a recording interpreter in the venv.
  (sh.home / 'isdaa-jax').mkdir()
  sh.fake(sh.home / 'isdaa-venv' / 'bin' / 'python')
  result = sh.bash(remote)
  assert result.returncode == 0, result.stderr
  [call] = sh.wait_for_calls(1)
  assert call['argv'] == ['-m', 'isdaa_jax.main', '--config=configs/tiny.py',
                          '--workdir=gs://my-bucket/runs/tiny', *OVERRIDES]
  assert call['cwd'] == str(sh.home / 'isdaa-jax')
  assert (sh.home / 'isdaa-train.pid').read_text().strip().isdigit()
  assert (sh.home / 'isdaa-train.log').exists()


def test_tpu_train_refuses_to_start_twice_and_stop_kills_the_run(sh):
  [argv] = dry_run(sh, TPU, 'train', env=TPU_ENV)
  (sh.home / 'isdaa-jax').mkdir()
  sleeper = subprocess.Popen(['sleep', '60'])
  try:
    (sh.home / 'isdaa-train.pid').write_text(f'{sleeper.pid}\n')
    result = sh.bash(remote_command(argv))
    assert result.returncode == 1
    assert 'already runs' in result.stderr and 'stop first' in result.stderr
    [stop] = dry_run(sh, TPU, 'stop', env=TPU_ENV)
    assert '--worker=all' in stop
    assert sh.bash(remote_command(stop)).returncode == 0
    assert sleeper.wait(timeout=10) != 0
    assert not (sh.home / 'isdaa-train.pid').exists()
  finally:
    if sleeper.poll() is None:
      sleeper.kill()
      sleeper.wait()


def test_tpu_train_workdir_and_environment(sh):
  env = dict(TPU_ENV, BUCKET='my-bucket', RUN_NAME='dpo run 1', CONFIG='configs/tiny.py:quick',
             TRAIN_ENV='XLA_FLAGS=--xla_dump_to=/tmp/x HF_HOME=/mnt/hf')
  [argv] = dry_run(sh, TPU, 'train', env=env)
  (sh.home / 'isdaa-jax').mkdir()
  sh.fake(sh.home / 'isdaa-venv' / 'bin' / 'python')
  assert sh.bash(remote_command(argv)).returncode == 0
  [call] = sh.wait_for_calls(1)
  # A bare bucket name gets gs://; a ':ARG' config suffix passes through to ml_collections.
  assert call['argv'][2:] == ['--config=configs/tiny.py:quick', '--workdir=gs://my-bucket/dpo run 1']
  assert call['env']['XLA_FLAGS'] == '--xla_dump_to=/tmp/x'
  assert call['env']['HF_HOME'] == '/mnt/hf'

  [argv] = dry_run(sh, TPU, 'train', env=dict(TPU_ENV, WORKDIR='gs://other/exp'))
  assert '--workdir=gs://other/exp' in shlex.split(remote_command(argv))


def test_tpu_setup_ships_this_checkout_and_installs_on_every_worker(sh):
  pack, scp, ssh = dry_run(sh, TPU, 'setup', env=TPU_ENV)
  tarball = str(sh.tmp / 'isdaa-jax-my-tpu.tar.gz')
  assert pack == ['git', '-C', str(ROOT), 'ls-files', '-z', '-co', '--exclude-standard', '|',
                  'tar', '-czf', tarball, '-C', str(ROOT), '--null', '-T', '-']
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5:7] == [tarball, 'my-tpu:isdaa-jax.tar.gz'] and '--worker=all' in scp
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu'] and '--worker=all' in ssh
  remote = remote_command(ssh)
  assert subprocess.run(['bash', '-n', '-c', remote]).returncode == 0
  words = shlex.split(remote.replace(';', ' ; '))
  assert 'jax[tpu]>=0.10.2,<0.11' in words and 'gcsfs' in words
  assert ['-e', '~/isdaa-jax'] == words[words.index('gcsfs') + 1:words.index('gcsfs') + 3]

  # The real run packs tracked and untracked (not ignored) files, never .git.
  result = sh.run(TPU, 'setup', env=TPU_ENV)
  assert result.returncode == 0, result.stderr
  with tarfile.open(tarball) as archive:
    names = set(archive.getnames())
  assert {'pyproject.toml', 'isdaa_jax/losses.py', 'launch/tpu_vm.sh', 'configs/tiny.py'} <= names
  assert not any(n.startswith('.git/') or '__pycache__' in n for n in names)


@pytest.mark.parametrize('subcommand, env', [
    ('create', {}),
    ('create', dict(QUEUED='1', SPOT='1')),
    ('setup', {}),
    ('train', {}),
    ('logs', dict(WORKER='3')),
    ('stop', {}),
    ('delete', {}),
    ('delete', dict(QUEUED='1', QUEUED_RESOURCE='my-queue')),
])
def test_tpu_dry_run_prints_exactly_what_runs(sh, subcommand, env):
  args = [subcommand, *(OVERRIDES if subcommand == 'train' else [])]
  printed = dry_run(sh, TPU, *args, env=dict(TPU_ENV, **env))
  gcloud_commands = [argv[1:] for argv in printed if argv[0] == 'gcloud']
  assert gcloud_commands and len(gcloud_commands) == len(printed) - (subcommand == 'setup')
  result = sh.run(TPU, *args, env=dict(TPU_ENV, **env))
  assert result.returncode == 0, result.stderr
  assert [call['argv'] for call in sh.calls()] == gcloud_commands


@pytest.mark.parametrize('env, expected', [
    ({}, ['tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b', '--project=my-project',
          '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']),
    (dict(ACCELERATOR_TYPE='v5litepod-16', SPOT='1'),
     ['tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b', '--project=my-project',
      '--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite', '--spot']),
    (dict(ACCELERATOR_TYPE='v6e-16', RUNTIME_VERSION='custom-1', QUEUED='1'),
     ['queued-resources', 'create', 'my-tpu', '--node-id=my-tpu', '--zone=us-central2-b',
      '--project=my-project', '--accelerator-type=v6e-16', '--runtime-version=custom-1']),
])
def test_tpu_create(sh, env, expected):
  [argv] = dry_run(sh, TPU, 'create', env=dict(TPU_ENV, **env))
  assert argv == ['gcloud', 'compute', 'tpus', *expected]


def test_tpu_logs_and_delete(sh):
  [logs] = dry_run(sh, TPU, 'logs', env=TPU_ENV)
  assert '--worker=0' in logs and remote_command(logs) == 'tail -n 200 -F ~/isdaa-train.log'
  [delete] = dry_run(sh, TPU, 'delete', env=TPU_ENV)
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu',
                    '--zone=us-central2-b', '--project=my-project', '--quiet']
  [delete] = dry_run(sh, TPU, 'delete', env=dict(TPU_ENV, QUEUED='1'))
  assert delete[3:6] == ['queued-resources', 'delete', 'my-tpu'] and '--force' in delete


@pytest.mark.parametrize('subcommand, missing', [
    ('create', 'TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE'),
    ('setup', 'TPU_NAME, ZONE, PROJECT'),
    ('train', 'TPU_NAME, ZONE, PROJECT, CONFIG, BUCKET'),
    ('logs', 'TPU_NAME, ZONE, PROJECT'),
    ('stop', 'TPU_NAME, ZONE, PROJECT'),
    ('delete', 'TPU_NAME, ZONE, PROJECT'),
])
def test_tpu_missing_variables_give_one_clear_message(sh, subcommand, missing):
  for flags in (['--dry-run'], []):
    result = sh.run(TPU, *flags, subcommand)
    assert result.returncode == 2
    assert result.stdout == ''
    assert result.stderr == (f'launch/tpu_vm.sh: {subcommand} needs {missing} set in the '
                             'environment (see launch/tpu_vm.sh --help).\n')
  assert sh.calls() == []


@pytest.mark.parametrize('args, env, message', [
    (['train'], dict(CONFIG='configs/nope.py'), 'is not a file under'),
    (['train'], dict(BUCKET='', WORKDIR='/local/dir'), 'is not a gs:// path'),
    (['create'], dict(ACCELERATOR_TYPE='v9x-8'), 'set RUNTIME_VERSION'),
    (['create', '--config.loss.name=ipo'], {}, 'takes no arguments'),
    (['launch'], {}, "unknown subcommand 'launch'"),
    ([], {}, 'give a subcommand'),
])
def test_tpu_user_errors(sh, args, env, message):
  result = sh.run(TPU, '--dry-run', *args, env=dict(TPU_ENV, **env))
  assert result.returncode == 2
  assert message in result.stderr and len(result.stderr.splitlines()) == 1
  assert result.stdout == ''


def test_tpu_help_lists_every_subcommand(sh):
  result = sh.run(TPU, '--help')
  assert result.returncode == 0
  for word in ('create', 'setup', 'train', 'logs', 'stop', 'delete', '--dry-run', 'TPU_NAME'):
    assert word in result.stdout


# ---------------------------------------------------------------------------------------------
# SLURM


def test_slurm_one_process_per_node_with_distributed_settings(sh):
  header = (ROOT / SLURM).read_text()
  assert '#SBATCH --ntasks-per-node=1' in header
  [argv] = dry_run(sh, SLURM, *OVERRIDES, env=dict(SLURM_ENV))
  task = argv.index('bash')
  assert argv[:task] == ['srun', '--nodes=2', '--ntasks=2', '--ntasks-per-node=1',
                         '--kill-on-bad-exit=1']
  assert argv[task + 3:task + 5] == ['isdaa-jax', 'python3']
  assert argv[task + 5:] == [
      '-m', 'isdaa_jax.main', '--config=configs/tiny.py', '--workdir=/shared/my runs/hh',
      '--config.distributed.initialize=on',
      '--config.distributed.coordinator_address=gpu-07:24242',
      '--config.distributed.num_processes=2', *OVERRIDES]

  # Each task runs the part after srun's options with its own SLURM_PROCID.
  for rank in (0, 1):
    result = subprocess.run(argv[task:], env=sh.env(SLURM_PROCID=str(rank)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
  first, second = sh.calls()
  assert first['name'] == 'python3'
  assert first['argv'] == argv[task + 5:] + ['--config.distributed.process_id=0']
  assert second['argv'] == argv[task + 5:] + ['--config.distributed.process_id=1']


def test_slurm_dry_run_prints_exactly_what_runs(sh):
  env = dict(SLURM_ENV, PYTHON='/shared/venv/bin/python', COORDINATOR_PORT='1234')
  [printed] = dry_run(sh, SLURM, *OVERRIDES, env=env)
  assert '--config.distributed.coordinator_address=gpu-07:1234' in printed
  by_env = sh.run(SLURM, *OVERRIDES, env=dict(env, DRY_RUN='1'))
  assert [shlex.split(line) for line in by_env.stdout.splitlines()] == [printed]
  assert sh.calls() == []
  result = sh.run(SLURM, *OVERRIDES, env=env)
  assert result.returncode == 0, result.stderr
  [call] = sh.calls()
  assert call['name'] == 'srun' and call['argv'] == printed[1:]


def test_slurm_coordinator_address_override_needs_no_scontrol(sh):
  (sh.bin / 'scontrol').unlink()
  env = dict(SLURM_ENV, COORDINATOR_ADDRESS='10.0.0.5:9999')
  [argv] = dry_run(sh, SLURM, env=env)
  assert '--config.distributed.coordinator_address=10.0.0.5:9999' in argv
  result = sh.run(SLURM, '--dry-run', env=dict(SLURM_ENV))
  assert result.returncode == 2 and 'set COORDINATOR_ADDRESS' in result.stderr


@pytest.mark.parametrize('drop, message', [
    (('SLURM_JOB_ID', 'SLURM_JOB_NODELIST', 'SLURM_NNODES'), 'no SLURM allocation'),
    (('CONFIG',), 'set CONFIG in the environment'),
    (('CONFIG', 'WORKDIR'), 'set CONFIG, WORKDIR in the environment'),
])
def test_slurm_missing_variables(sh, drop, message):
  env = {k: v for k, v in SLURM_ENV.items() if k not in drop}
  result = sh.run(SLURM, '--dry-run', env=env)
  assert result.returncode == 2 and result.stdout == ''
  assert message in result.stderr and len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Single host, several GPUs


def test_gpu_single_host(sh):
  env = dict(CONFIG='configs/tiny.py', WORKDIR='runs/my run', GPUS='0,1,2,3')
  [printed] = dry_run(sh, GPU, *OVERRIDES, env=env)
  expected = ['-m', 'isdaa_jax.main', '--config=configs/tiny.py', '--workdir=runs/my run',
              '--config.distributed.initialize=off', *OVERRIDES]
  assert printed == ['env', 'CUDA_VISIBLE_DEVICES=0,1,2,3', 'python3', *expected]
  result = sh.run(GPU, *OVERRIDES, env=env)
  assert result.returncode == 0, result.stderr
  [call] = sh.calls()
  assert call['name'] == 'python3' and call['argv'] == expected
  assert call['env']['CUDA_VISIBLE_DEVICES'] == '0,1,2,3'

  [printed] = dry_run(sh, GPU, env=dict(env, GPUS='', PYTHON='/opt/venv/bin/python'))
  assert printed[0] == '/opt/venv/bin/python'


@pytest.mark.parametrize('env, message', [
    ({}, 'set CONFIG, WORKDIR in the environment'),
    (dict(CONFIG='configs/tiny.py'), 'set WORKDIR in the environment'),
    (dict(CONFIG='configs/missing.py', WORKDIR='runs/x'), 'is not a file'),
])
def test_gpu_single_host_user_errors(sh, env, message):
  result = sh.run(GPU, '--dry-run', env=env)
  assert result.returncode == 2 and result.stdout == ''
  assert message in result.stderr and len(result.stderr.splitlines()) == 1
