"""Reading and writing safetensors files one tensor at a time, without torch.

The format (huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of
JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw
little-endian tensor bytes. Reading memory-maps the file, so slicing a tensor touches only the
pages of that slice (each device reads just its shard); writing streams tensors to disk, so only
one tensor is in host memory at a time. bfloat16 is numpy's via ml_dtypes; this is why the module
reads the format directly instead of through safetensors' numpy framework, which has no bfloat16.
"""

import json
import math
import os
import struct
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from isdaa_jax.errors import UserError

DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'), 'I8': np.dtype('i1'),
    'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}
# A header larger than this is not a safetensors file (the library's own limit is 100 MB).
_MAX_HEADER = 100 * 2**20


class SafetensorsError(UserError):
  """A file that is not a readable safetensors file."""


class Reader:
  """Lazy, read-only view of one safetensors file: `array(name)` is a memory-mapped ndarray."""

  def __init__(self, path: str):
    self.path = str(path)
    size = os.path.getsize(self.path)
    with open(self.path, 'rb') as f:
      prefix = f.read(8)
      n = struct.unpack('<Q', prefix)[0] if len(prefix) == 8 else -1
      if not 0 < n <= min(_MAX_HEADER, size - 8):
        raise SafetensorsError(f'{self.path} is not a safetensors file (bad header length); '
                               're-download or re-export the checkpoint')
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f'{self.path} has a corrupt safetensors header ({e}); '
                               're-download or re-export the checkpoint') from None
    self.metadata = header.pop('__metadata__', None) or {}
    self._entries = header
    self._data_start = 8 + n
    self._data_size = size - self._data_start
    self._mmap = None
    for name in header:
      self._check(name)

  def _check(self, name):
    e = self._entries[name]
    if e.get('dtype') not in DTYPES:
      raise SafetensorsError(f'tensor {name!r} in {self.path} has unsupported dtype '
                             f'{e.get("dtype")!r}; supported: {", ".join(DTYPES)}')
    begin, end = e['data_offsets']
    nbytes = math.prod(e['shape']) * DTYPES[e['dtype']].itemsize
    if end - begin != nbytes or not 0 <= begin <= end <= self._data_size:
      raise SafetensorsError(f'tensor {name!r} in {self.path} has inconsistent offsets (the file '
                             'is truncated or corrupt); re-download or re-export the checkpoint')

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]['shape'])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]['dtype']]

  def array(self, name: str) -> np.ndarray:
    """The tensor as a read-only memory-mapped array; nothing is read until it is sliced."""
    e = self._entries[name]
    begin, end = e['data_offsets']
    if begin == end:
      return np.zeros(e['shape'], self.dtype(name))
    if self._mmap is None:
      self._mmap = np.memmap(self.path, np.uint8, mode='r')
    start = self._data_start + begin
    return self._mmap[start:self._data_start + end].view(self.dtype(name)).reshape(e['shape'])


def write(path: str, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
          produce: Callable[[str], np.ndarray], metadata: Mapping[str, str]) -> None:
  """Writes tensors `specs` = [(name, shape, dtype)], asking `produce(name)` for each in turn."""
  header, offset = {}, 0
  for name, shape, dtype in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = dict(dtype=_NAMES[np.dtype(dtype)], shape=list(shape),
                        data_offsets=[offset, offset + nbytes])
    offset += nbytes
  header['__metadata__'] = dict(metadata)
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # keeps every tensor 8-byte aligned, as the library does
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for name, shape, dtype in specs:
      value = np.asarray(produce(name), order='C')
      if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
        raise ValueError(f'tensor {name!r}: produced {value.shape} {value.dtype}, '
                         f'declared {tuple(shape)} {np.dtype(dtype)}')
      f.write(value.tobytes())
