"""TPU generations and slice names: what `isdaa_jax.plan` compiles for.

  slice_ = parse('v5p-32')        # or 'v5litepod-16', 'v6e-8', 'v4-32', 'v5p:2x2x4'
  slice_.chip.peak_flops, slice_.topology  ->  459e12, 'v5p:2x2x4'

Per-chip figures are Google's published specifications (Cloud TPU documentation, "TPU v4",
"TPU v5e", "TPU v5p" and "TPU v6e" system-architecture tables, read November 2026): peak bfloat16
FLOP/s, HBM capacity and HBM bandwidth. HBM capacities are taken as GiB (a v5p chip reports
95.7 GiB usable to JAX); bandwidths are in bytes per second as published.
"""

import dataclasses
import math
import re

from isdaa_jax.errors import UserError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the topology prefix libtpu accepts ('v5p', 'v5e', ...)
  peak_flops: float  # bfloat16 FLOP/s per chip
  hbm_bytes: int  # per chip
  hbm_bandwidth: float  # bytes/s per chip
  cores_per_chip: int  # TensorCores: the accelerator-type number counts these on v4 and v5p
  dims: int  # 3 (3-D torus) or 2


CHIPS = {
    'v4': Chip('v4', 275e12, 32 * GiB, 1200e9, cores_per_chip=2, dims=3),
    'v5e': Chip('v5e', 197e12, 16 * GiB, 819e9, cores_per_chip=1, dims=2),
    'v5p': Chip('v5p', 459e12, 95 * GiB, 2765e9, cores_per_chip=2, dims=3),
    'v6e': Chip('v6e', 918e12, 32 * GiB, 1640e9, cores_per_chip=1, dims=2),
}
# Accelerator-type prefixes as `gcloud compute tpus tpu-vm create --accelerator-type` spells them.
ACCELERATOR_PREFIXES = {'v4': 'v4', 'v5p': 'v5p', 'v5litepod': 'v5e', 'v5e': 'v5e', 'v6e': 'v6e'}


class UnknownTopologyError(UserError):
  """A slice name the planner cannot map to a TPU topology."""


@dataclasses.dataclass(frozen=True)
class Slice:
  chip: Chip
  topology: str  # 'v5p:2x2x4', what jax.experimental.topologies takes
  num_chips: int


def default_shape(num_chips: int, dims: int) -> tuple[int, ...]:
  """The shape Cloud TPU gives a slice of `num_chips` (a power of two): from 2x2(x1), double the
  smallest side, the last of equal ones (v5p-32 = 2x2x4, v5p-128 = 4x4x4, v5e-16 = 4x4)."""
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(num_chips)
  if num_chips < 4:
    return (1,) * (dims - 1) + (num_chips,)
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < num_chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def _known() -> str:
  return ('accelerator types ' + ', '.join(f'{p}-N' for p in ACCELERATOR_PREFIXES)
          + ' (N a power of two) or topologies ' + ', '.join(f'{c}:AxBxC' if CHIPS[c].dims == 3
                                                            else f'{c}:AxB' for c in CHIPS))


def parse(name: str) -> Slice:
  """An accelerator type ('v5p-32', 'v5litepod-16') or topology string ('v5p:2x2x4')."""
  m = re.fullmatch(r'(v\w+?):(\d+(?:x\d+)+)', name.strip())
  if m and m.group(1) in CHIPS:
    chip = CHIPS[m.group(1)]
    shape = tuple(int(s) for s in m.group(2).split('x'))
    if len(shape) == chip.dims and all(s > 0 for s in shape):
      return Slice(chip, name.strip(), math.prod(shape))
  m = re.fullmatch(r'(v\w+?)-(\d+)', name.strip())
  if m and m.group(1) in ACCELERATOR_PREFIXES:
    chip = CHIPS[ACCELERATOR_PREFIXES[m.group(1)]]
    count = int(m.group(2))
    chips = count // chip.cores_per_chip
    if count % chip.cores_per_chip == 0 and chips >= 1 and not chips & (chips - 1):
      shape = default_shape(chips, chip.dims)
      return Slice(chip, f'{chip.name}:{"x".join(map(str, shape))}', chips)
  raise UnknownTopologyError(f'unknown TPU slice {name!r}; pass one of the {_known()}, e.g. '
                             '--topology=v5p-32 or --topology=v5p:2x2x4')
