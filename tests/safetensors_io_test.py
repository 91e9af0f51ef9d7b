"""The torch-free safetensors reader/writer agrees with the safetensors library."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from isdaa_jax.model import safetensors_io


def _tensors():
  rng = np.random.default_rng(0)
  return {
      'a': rng.normal(size=(5, 7)).astype(np.float32),
      'b.weight': rng.normal(size=(3, 2, 4)).astype(np.float16),
      'c': np.arange(6, dtype=np.int64),
      'scalar': np.asarray(2.5, np.float64),
      'empty': np.zeros((0, 3), np.float32),
  }


def test_reader_reads_what_the_library_writes(tmp_path):
  tensors = _tensors()
  safetensors.numpy.save_file(tensors, tmp_path / 'x.safetensors', metadata={'format': 'pt'})
  r = safetensors_io.Reader(tmp_path / 'x.safetensors')
  assert sorted(r.keys()) == sorted(tensors) and r.metadata == {'format': 'pt'}
  for k, v in tensors.items():
    assert r.shape(k) == v.shape and r.dtype(k) == v.dtype
    np.testing.assert_array_equal(r.array(k), v)
  np.testing.assert_array_equal(r.array('a')[1:3, 2:5], tensors['a'][1:3, 2:5])


def test_library_reads_what_the_writer_writes(tmp_path):
  tensors = _tensors()
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  safetensors_io.write(tmp_path / 'y.safetensors', specs, tensors.__getitem__, {'format': 'pt'})
  with open(tmp_path / 'y.safetensors', 'rb') as f:
    assert struct.unpack('<Q', f.read(8))[0] % 8 == 0
  with safe_open(tmp_path / 'y.safetensors', 'numpy') as f:
    assert f.metadata() == {'format': 'pt'}
    for k, v in tensors.items():
      np.testing.assert_array_equal(f.get_tensor(k), v)


def test_bfloat16_round_trip_and_library_view(tmp_path):
  x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.bfloat16)
  safetensors_io.write(tmp_path / 'z.safetensors', [('x', x.shape, x.dtype)], lambda _: x, {})
  r = safetensors_io.Reader(tmp_path / 'z.safetensors')
  assert r.dtype('x') == ml_dtypes.bfloat16
  np.testing.assert_array_equal(r.array('x'), x)
  with safe_open(tmp_path / 'z.safetensors', 'flax') as f:
    np.testing.assert_array_equal(np.asarray(f.get_tensor('x')).astype(np.float32),
                                  x.astype(np.float32))


def test_writer_rejects_a_tensor_unlike_its_spec(tmp_path):
  with pytest.raises(ValueError, match="tensor 'x'"):
    safetensors_io.write(tmp_path / 'w.safetensors', [('x', (2,), np.float32)],
                         lambda _: np.zeros(3, np.float32), {})


@pytest.mark.parametrize('damage', ['truncate', 'header', 'dtype'])
def test_corrupt_files_raise(tmp_path, damage):
  path = tmp_path / 'v.safetensors'
  safetensors.numpy.save_file({'a': np.ones((4, 4), np.float32)}, path)
  raw = path.read_bytes()
  n = struct.unpack('<Q', raw[:8])[0]
  if damage == 'truncate':
    raw = raw[:-8]
  elif damage == 'header':
    raw = raw[:8] + b'{' * n + raw[8 + n:]
  else:
    header = json.loads(raw[8:8 + n])
    header['a']['dtype'] = 'X9'
    blob = json.dumps(header).encode().ljust(n)
    raw = raw[:8] + blob + raw[8 + n:]
  path.write_bytes(raw)
  with pytest.raises(safetensors_io.SafetensorsError, match='v.safetensors'):
    safetensors_io.Reader(path)
