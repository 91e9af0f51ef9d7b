"""Device mesh, the logical-axis table, and shardings of parameters, optimizer state and batches.

One mesh with axes (data, fsdp, tensor) serves 1 device, 8 simulated CPU devices, a TPU slice and
several hosts. Parameters carry logical axis names (`logical_axes` metadata on each nnx.Param);
`LOGICAL_RULES` is the only place that maps them onto mesh axes.
"""

import math
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from isdaa_jax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
# The batch is split over every data-parallel axis (fsdp included: ZeRO-3 style).
BATCH_AXES = ('data', 'fsdp')

LOGICAL_RULES = {
    'batch': BATCH_AXES,
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'lora_rank': None,
    'layers': None,
}


class MeshError(UserError):
  """The requested mesh does not fit the devices."""


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for `num_devices`; one -1 takes the devices the others leave."""
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise MeshError(f'config.mesh {dict(zip(MESH_AXES, sizes))} is invalid: sizes must be >= 1, '
                    'with at most one -1 (the remaining devices)')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise MeshError(f'config.mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} '
                      f'devices: {num_devices} is not divisible by {fixed}')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(f'config.mesh data*fsdp*tensor = {math.prod(sizes)} but there are '
                    f'{num_devices} devices; make the product match or set one axis to -1')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  if len(devices) == len(jax.devices()):
    # Topology-aware placement (ICI rings on TPU); explicit Auto axes keep ordinary sharded
    # steps working (make_mesh defaults to Explicit axes in recent JAX).
    return jax.make_mesh(shape, MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int],
                    mesh: Mesh) -> P:
  """PartitionSpec for an array; a dimension its mesh axes do not divide is replicated."""
  spec = []
  used = set()
  for name, dim in zip(logical_axes, shape):
    axes = LOGICAL_RULES[name] if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def _var_sharding(var, mesh):
  axes = var.get_metadata().get('logical_axes')
  if axes is None:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, logical_to_spec(axes, var.get_value().shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh):
  """NamedShardings (as a tree of plain leaves) for an nnx.State of annotated Variables."""
  return jax.tree.map(lambda v: _var_sharding(v, mesh), state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, ...] batch leaves: B over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax Arrays sharded over the data-parallel axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
