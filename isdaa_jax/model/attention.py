"""Grouped-query attention kernels and masks.

Shapes: q [B, T, N, H] (N query heads), k and v [B, S, K, H] (K key/value heads, N % K == 0),
mask [B, T, S] bool (True = may attend). Softmax always runs in float32.

Implementations (`config.model.attention`):
  'xla'     plain scores [B, K, G, T, S] and softmax; any platform.
  'blocked' online softmax over key blocks: never holds the float [T, S] scores of a head
            (only the shared boolean mask), same result as 'xla' to float rounding.
  'cudnn'   jax.nn.dot_product_attention with the fused cuDNN kernel (GPU only).
"""

import jax
import jax.numpy as jnp

# Masked scores; finite so that a fully masked (padding) query row stays finite instead of NaN.
_MASKED = -1e30
_KEY_BLOCK = 128


def segment_causal_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T, T]: causal, within equal segments, never onto padding (segment 0)."""
  t = segment_ids_BT.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  real = segment_ids_BT[:, None, :] != 0
  return causal[None] & same & real


def _grouped(q_BTNH, num_kv_heads):
  b, t, n, h = q_BTNH.shape
  return q_BTNH.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _xla(q, k, v, mask):
  b, t, n, h = q.shape
  qg = _grouped(q, k.shape[2]) * (h ** -0.5)
  scores = jnp.einsum('btkgh,bskh->bkgts', qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v)
  return out.reshape(b, t, n, h)


def _blocked(q, k, v, mask, block=_KEY_BLOCK):
  b, t, n, h = q.shape
  s = k.shape[1]
  pad = (-s) % block
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
  nb = (s + pad) // block
  kv_heads = k.shape[2]
  qg = _grouped(q, kv_heads).astype(jnp.float32) * (h ** -0.5)
  k_blocks = k.reshape(b, nb, block, kv_heads, h).swapaxes(0, 1)
  v_blocks = v.reshape(b, nb, block, kv_heads, h).swapaxes(0, 1)
  m_blocks = mask.reshape(b, t, nb, block).transpose(2, 0, 1, 3)

  def step(carry, xs):
    acc, row_max, denom = carry
    kb, vb, mb = xs
    scores = jnp.einsum('btkgh,bskh->bkgts', qg, kb.astype(jnp.float32))
    scores = jnp.where(mb[:, None, None], scores, _MASKED)
    new_max = jnp.maximum(row_max, scores.max(-1))
    correction = jnp.exp(row_max - new_max)
    p = jnp.exp(scores - new_max[..., None])
    acc = acc * correction[..., None] + jnp.einsum('bkgts,bskh->bkgth', p,
                                                   vb.astype(jnp.float32))
    denom = denom * correction + p.sum(-1)
    return (acc, new_max, denom), None

  g = n // kv_heads
  init = (jnp.zeros((b, kv_heads, g, t, h), jnp.float32),
          jnp.full((b, kv_heads, g, t), _MASKED, jnp.float32),
          jnp.zeros((b, kv_heads, g, t), jnp.float32))
  (acc, _, denom), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, m_blocks))
  out = acc / denom[..., None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _cudnn(q, k, v, mask):
  if jax.default_backend() != 'gpu':
    raise ValueError("config.model.attention='cudnn' needs a GPU; use 'xla' or 'blocked' on "
                     f'{jax.default_backend()}')
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation='cudnn')


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, implementation: str):
  if implementation == 'xla':
    return _xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  if implementation == 'blocked':
    return _blocked(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  if implementation == 'cudnn':
    return _cudnn(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  raise ValueError(f"config.model.attention={implementation!r} is not one of 'xla', 'blocked', "
                   "'cudnn'")
