"""Peak memory of sequence log-probs (forward + backward), chunked vs full logits, as V x T grows.

  python benchmarks/logprobs_memory.py [--batch 1 --hidden 256 --chunk 128]

Prints one JSON object per (vocab, length) point and a summary line. Memory is XLA's compiled
temporary-buffer size for the jitted value-and-grad (memory_analysis), i.e. what the device must
hold beyond inputs and outputs; the full-logits path holds [B, T, V] float32 logits (and their
gradient), the chunked path only [B, chunk, V] at a time.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from isdaa_jax.model import logprobs


def temp_bytes(b, t, d, v, chunk):
  def loss(h, w, y, m):
    s, _ = logprobs.sequence_logps(h, w, y, m, chunk)
    return jnp.sum(s)

  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--chunk', type=int, default=128)
  a = p.parse_args()
  rows = []
  for v in (8192, 32000, 128256):
    for t in (512, 2048):
      full = temp_bytes(a.batch, t, a.hidden, v, 0)
      chunked = temp_bytes(a.batch, t, a.hidden, v, a.chunk)
      row = dict(vocab=v, length=t, batch=a.batch, chunk=a.chunk,
                 logits_bytes=a.batch * t * v * 4, full_temp_bytes=full,
                 chunked_temp_bytes=chunked, ratio=full / max(chunked, 1),
                 backend=jax.default_backend())
      rows.append(row)
      print(json.dumps(row), flush=True)
  big = [r for r in rows if r['vocab'] == 128256]
  print(json.dumps(dict(
      summary='chunked temp memory grows with V x chunk, full with V x T',
      chunked_growth_T512_to_T2048=big[1]['chunked_temp_bytes'] / big[0]['chunked_temp_bytes'],
      full_growth_T512_to_T2048=big[1]['full_temp_bytes'] / big[0]['full_temp_bytes'])))


if __name__ == '__main__':
  main()
