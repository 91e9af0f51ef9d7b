"""Multi-host start-up: `jax.distributed.initialize` when the config or the environment asks.

TPU VMs and SLURM allocations describe themselves (JAX detects both); other clusters pass the
coordinator explicitly, either in `config.distributed` or as JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (the config wins). Several CPU processes on one machine
(tests, simulated hosts) need gloo collectives.
"""

import os
from typing import Mapping, Optional

import jax
from absl import logging

from isdaa_jax import host_memory
from isdaa_jax.errors import UserError


class DistributedError(UserError):
  """The distributed runtime could not start with the given coordinator settings."""


def _environment_asks(env: Mapping[str, str]) -> bool:
  return bool(env.get('JAX_COORDINATOR_ADDRESS') or env.get('TPU_WORKER_HOSTNAMES')
              or (env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1')) > 1))


def _is_loopback(host_port: str) -> bool:
  return host_port.rsplit(':', 1)[0] in ('127.0.0.1', 'localhost', '[::1]')


def initialize_kwargs(dist_config, env: Mapping[str, str]) -> Optional[dict]:
  """Keyword arguments for `jax.distributed.initialize`, or None when it should not be called.

  An empty dict means "let JAX detect the cluster" (TPU VM, SLURM).
  """
  mode = dist_config.initialize
  address = dist_config.coordinator_address or env.get('JAX_COORDINATOR_ADDRESS', '')
  if mode == 'off' or (mode == 'auto' and not dist_config.coordinator_address
                       and not _environment_asks(env)):
    return None
  if not address:
    return {}
  num_processes = dist_config.num_processes or int(env.get('JAX_NUM_PROCESSES', '0'))
  process_id = (dist_config.process_id if dist_config.process_id >= 0
                else int(env.get('JAX_PROCESS_ID', '-1')))
  kwargs = dict(coordinator_address=address)
  # Left out, JAX asks the cluster environment (SLURM, ...) for them.
  if num_processes > 0:
    kwargs['num_processes'] = num_processes
  if process_id >= 0:
    kwargs['process_id'] = process_id
  if _is_loopback(address):
    # Several processes on one machine: bind the coordinator to loopback only (by default it
    # listens on every interface).
    kwargs['coordinator_bind_address'] = address
  return kwargs


def initialize(dist_config, env: Optional[Mapping[str, str]] = None) -> None:
  """Starts the JAX distributed runtime per `config.distributed` (idempotent).

  Must run before anything touches a JAX device: it first sets the host allocator
  (`host_memory.configure`), which only reaches threads that have not allocated yet.
  """
  host_memory.configure(dist_config.host_malloc)
  if dist_config.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', dist_config.cpu_collectives)
  kwargs = initialize_kwargs(dist_config, os.environ if env is None else env)
  if kwargs is None or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(
        f'jax.distributed.initialize({kwargs}) failed ({type(e).__name__}: {e}); check '
        'config.distributed.coordinator_address, num_processes and process_id (every process '
        'needs the same address and count and its own id), or set '
        '--config.distributed.initialize=off for a single process') from e
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
