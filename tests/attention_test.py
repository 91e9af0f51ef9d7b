"""Attention kernels and masks: 'blocked' == 'xla' == a naive per-head reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isdaa_jax.model import attention


def _naive(q, k, v, mask):
  """Per-head softmax attention with GQA by repeating key/value heads, as HF's repeat_kv."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask[:, None], s, -jnp.inf)
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(s, -1), v)


def _qkv(b, t, s, n, kv, h, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return f(b, t, n, h), f(b, s, kv, h), f(b, s, kv, h)


def test_segment_causal_mask():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = attention.segment_causal_mask(seg)[0]
  assert bool(m[1, 0]) and not bool(m[0, 1])  # causal
  assert not bool(m[2, 1])  # other segment
  assert not bool(m[4, 4]) and not bool(m[3, 4])  # padding is never a key
  assert bool(m[3, 2]) and bool(m[3, 3])


@pytest.mark.parametrize('t,s', [(200, 200), (1, 300), (7, 130)])
def test_blocked_and_xla_match_naive_with_gqa_and_any_mask(t, s):
  """Square self-attention, one decoding query over a long cache, a chunk over a cache."""
  q, k, v = _qkv(2, t, s, 6, 2, 8)
  rng = np.random.default_rng(1)
  mask = jnp.asarray(rng.random((2, t, s)) < 0.3).at[:, :, 0].set(True)
  want = _naive(q, k, v, mask)
  for impl in ('xla', 'blocked'):
    got = jax.jit(attention.attention, static_argnums=4)(q, k, v, mask, impl)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)


def test_blocked_gradients_match_xla_and_padding_rows_are_zero():
  q, k, v = _qkv(1, 140, 140, 4, 2, 8, seed=2)
  seg = jnp.array([[1] * 100 + [2] * 30 + [0] * 10])
  mask = attention.segment_causal_mask(seg)  # padding query rows see nothing at all

  def grads(impl):
    f = lambda q, k, v: jnp.sum(jnp.sin(attention.attention(q, k, v, mask, impl)[:, :130]))
    return jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)

  for impl in ('xla', 'blocked'):
    out = attention.attention(q, k, v, mask, impl)
    np.testing.assert_array_equal(out[:, 130:], 0.0)
    np.testing.assert_allclose(out[:, :130], _naive(q, k, v, mask)[:, :130], atol=2e-5)
  for a, b in zip(grads('xla'), grads('blocked')):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_bfloat16_inputs_keep_their_dtype():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 9, 9, 4, 4, 8))
  mask = attention.segment_causal_mask(jnp.ones((1, 9), jnp.int32))
  want = _naive(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
  for impl in ('xla', 'blocked'):
    got = attention.attention(q, k, v, mask, impl)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)
    f = lambda q, k, v: jnp.sum(attention.attention(q, k, v, mask, impl).astype(jnp.float32))
    grads = jax.grad(f, (0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_cudnn_refuses_cpu_and_unknown_names_fail():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 4, 4, 2, 2, 8))
  mask = attention.segment_causal_mask(jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match='needs a GPU'):
    attention.attention(q, k, v, mask, 'cudnn')
  with pytest.raises(ValueError, match="not one of 'xla', 'blocked', 'cudnn'"):
    attention.attention(q, k, v, mask, 'flash')


def test_blocked_training_memory_does_not_hold_float_scores():
  """Compiled temporaries of value-and-grad: 'xla' holds [T, S] float32 scores per head,
  'blocked' only a key block's worth."""
  b, t, n, kv, h = 1, 2048, 4, 2, 16

  def temp_bytes(impl):
    f = lambda q, k, v, m: jnp.sum(attention.attention(q, k, v, m, impl))
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, t, n, h), (b, t, kv, h),
                                                             (b, t, kv, h))]
    shapes.append(jax.ShapeDtypeStruct((b, t, t), jnp.bool_))
    compiled = jax.jit(jax.value_and_grad(f, (0, 1, 2))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  scores_bytes = b * n * t * t * 4  # 64 MiB
  xla, blocked = temp_bytes('xla'), temp_bytes('blocked')
  assert xla >= 4 * scores_bytes  # scores, probabilities and their gradients
  assert blocked < scores_bytes / 2 and blocked < xla / 8
