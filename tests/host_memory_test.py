"""The host allocator setting: freed blocks are reused (no page faults on reallocation)."""

import subprocess
import sys
import textwrap

import pytest

from isdaa_jax import host_memory
from isdaa_jax.errors import UserError

# Allocates, touches and frees a 256 MiB block with malloc eight times and prints the minor page
# faults that took.
_PROBE = textwrap.dedent('''\
    import ctypes, ctypes.util, resource, sys
    from isdaa_jax import host_memory
    print(host_memory.configure(sys.argv[1]))
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
      block = libc.malloc(256 << 20)
      ctypes.memset(block, 1, 256 << 20)  # touches every page
      libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _faults(mode: str) -> tuple[bool, int]:
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == 'True', int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_reuse_faults_a_freed_block_in_once_where_the_system_default_faults_every_time():
  kept, reuse_faults = _faults('reuse')
  not_kept, system_faults = _faults('system')
  assert kept and not not_kept
  # glibc mmaps and unmaps the block each time (pages of 4 KiB, or 2 MiB where transparent huge
  # pages back it): 8 blocks' worth of faults; kept, only the first block's.
  assert reuse_faults * 4 < system_faults, (reuse_faults, system_faults)


def test_auto_follows_the_machine_and_bad_modes_are_refused(monkeypatch):
  monkeypatch.setattr(host_memory, 'has_accelerator', lambda: True)
  assert host_memory.configure('auto') is False  # accelerators: glibc's defaults stay
  assert host_memory.configure('system') is False
  with pytest.raises(UserError, match="host_malloc='tcmalloc' is not one of"):
    host_memory.configure('tcmalloc')
