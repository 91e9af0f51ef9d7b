"""Chunked log-probs equal the naive full log-softmax, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isdaa_jax.model import logprobs


def _naive(hidden, unembed, targets):
  logits = jnp.einsum('btd,dv->btv', hidden, unembed)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize('chunk', [0, 4, 7, 64])
def test_chunked_equals_naive_values_and_grads(chunk):
  rng = np.random.default_rng(0)
  b, t, d, v = 2, 19, 8, 33
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.int32)
  np.testing.assert_allclose(logprobs.token_logps(hidden, unembed, targets, chunk),
                             _naive(hidden, unembed, targets), rtol=1e-5, atol=1e-5)

  def f(h, w):
    s, _ = logprobs.sequence_logps(h, w, targets, mask, chunk)
    return jnp.sum(s * jnp.array([1.0, -2.0]))

  def f_naive(h, w):
    return jnp.sum(jnp.sum(_naive(h, w, targets) * mask, -1) * jnp.array([1.0, -2.0]))

  for got, want in zip(jax.grad(f, (0, 1))(hidden, unembed),
                       jax.grad(f_naive, (0, 1))(hidden, unembed)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  _, counts = logprobs.sequence_logps(hidden, unembed, targets, mask, chunk)
  np.testing.assert_array_equal(counts, mask.sum(-1))


def test_logps_are_float32_from_bfloat16_hidden():
  h = jnp.ones((1, 5, 4), jnp.bfloat16)
  w = jnp.ones((4, 9), jnp.float32)
  out = logprobs.token_logps(h, w, jnp.zeros((1, 5), jnp.int32), 2)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.full((1, 5), -np.log(9.0)), rtol=1e-6)


def test_chunking_bounds_compiled_memory():
  """The chunked backward's temporaries do not grow with T x V like the full logits'."""
  b, t, d, v = 1, 1024, 16, 4096

  def peak(chunk):
    def f(h, w, y):
      return jnp.sum(logprobs.token_logps(h, w, y, chunk))
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))
    return jax.jit(jax.grad(f, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  full_logits = b * t * v * 4
  assert peak(0) >= full_logits
  assert peak(64) < full_logits / 4
