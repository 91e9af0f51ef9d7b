"""Keeps the host memory XLA:CPU frees for its next step, instead of handing it back to the OS.

On the CPU backend each step's temporaries (several GB for a 135M-parameter model at batch 8 x 256)
are malloc'ed and freed every step. glibc serves blocks that large with fresh mmap()s (from
per-thread arenas), so every step page-faults them back in and the kernel zeroes them again: for
SmolLM2-135M 2.3 M page faults and ~15% of the step as system time (perf). One arena that never
mmaps, never trims and grows in 1 GiB pieces reuses those pages: measured 7-10% faster steps
(benchmarks/README.md). The heap then stays at its high-water mark: where a step's temporaries
are small (remat) it gains nothing and raises peak RSS (configs/smollm2_hh.py: 6.4 against 4.0
GiB), so such configs set 'system'.

The arena setting only reaches threads that allocate for the first time after it, so this runs
before JAX starts its CPU client (`distributed.initialize` calls it first). Not for accelerators:
there the step's memory is on the device and the host's allocator serves many loader threads.
"""

import ctypes
import ctypes.util
import glob
import sys

from absl import logging

from isdaa_jax.errors import UserError

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
CHOICES = ('auto', 'reuse', 'system')
# Device files of TPU VMs (accel: v4/v5e; vfio: v5p/v6e), NVIDIA and AMD GPUs.
_ACCELERATOR_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def has_accelerator() -> bool:
  """Whether this machine shows a TPU or GPU device file (looked up without starting JAX)."""
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def configure(mode: str) -> bool:
  """Applies `config.distributed.host_malloc`; returns whether freed memory is now kept.

  'reuse' keeps it; 'system' leaves glibc's defaults; 'auto' is 'reuse' on a machine without a
  TPU or GPU. Elsewhere than Linux glibc it does nothing.
  """
  if mode not in CHOICES:
    raise UserError(f'config.distributed.host_malloc={mode!r} is not one of '
                    f'{", ".join(map(repr, CHOICES))}')
  if mode == 'system' or (mode == 'auto' and has_accelerator()):
    return False
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only: musl has a mallopt that ignores these
  except (OSError, AttributeError, TypeError):
    return False
  # TRIM_THRESHOLD -1 is SIZE_MAX to glibc (it takes size_t): never trim the heap's top.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 1 << 30))
  applied = all(mallopt(param, value) == 1 for param, value in settings)
  logging.info('host malloc: freed memory kept for reuse (%s)', 'ok' if applied else 'partial')
  return applied
