"""Multi-host start-up: `jax.distributed.initialize` when the config or the environment asks.

TPU VMs and SLURM allocations describe themselves (JAX detects both); other clusters pass the
coordinator explicitly (`config.distributed.*` or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Several CPU processes on one machine (tests, simulated hosts) need gloo
collectives.
"""

import os

import jax
from absl import logging


def _environment_asks() -> bool:
  env = os.environ
  return bool(env.get('JAX_COORDINATOR_ADDRESS') or env.get('TPU_WORKER_HOSTNAMES')
              or (env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1')) > 1))


def initialize(dist_config) -> None:
  """Initializes the JAX distributed runtime per `config.distributed` (idempotent)."""
  if dist_config.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', dist_config.cpu_collectives)
  mode = dist_config.initialize
  if mode == 'off' or (mode == 'auto' and not dist_config.coordinator_address
                       and not _environment_asks()):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if dist_config.coordinator_address:
    host_port = dist_config.coordinator_address
    kwargs = dict(coordinator_address=host_port, num_processes=dist_config.num_processes,
                  process_id=dist_config.process_id)
    if host_port.startswith('127.0.0.1:') or host_port.startswith('localhost:'):
      # Bind the coordinator to loopback only (the default binds every interface).
      kwargs['coordinator_bind_address'] = host_port
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'jax.distributed.initialize failed ({e}); check config.distributed.coordinator_address'
        ', num_processes and process_id, or set --config.distributed.initialize=off for a '
        'single process') from e
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
