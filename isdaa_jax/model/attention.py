"""Grouped-query attention kernels and masks.

Shapes: q [B, T, N, H] (N query heads), k and v [B, S, K, H] (K key/value heads, N % K == 0),
mask [B, T, S] bool (True = may attend). Scores accumulate and the softmax runs in float32. A query
row that may attend to nothing (padding) outputs zeros in 'xla' and 'blocked', so the two agree
everywhere.

Implementations (`config.model.attention`):
  'xla'     plain scores [B, K, G, T, S] and softmax; any platform.
  'blocked' online softmax over key blocks with a flash-attention backward (custom VJP that
            recomputes each block from the saved log-sum-exp): neither pass holds float [T, S]
            scores, only the boolean mask it is given. Same result as 'xla' to float rounding.
  'cudnn'   jax.nn.dot_product_attention with the fused cuDNN kernel (GPU, bfloat16 only).
"""

import jax
import jax.numpy as jnp

from isdaa_jax.errors import UserError

# Masked scores: finite, so no inf - inf NaN appears in the max-subtracted softmax.
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
  # exp(-1e30 - max) is already 0 where a row has a visible key; the product only zeroes the
  # uniform distribution a fully masked row would otherwise get.
  probs = (jax.nn.softmax(scores, axis=-1) * mask[:, None, None]).astype(v.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v)
  return out.reshape(b, t, n, h)


def _block_scores(qg, kb, mb):
  """Float32 scores [B, K, G, T, block] of one key block, _MASKED where masked."""
  s = jnp.einsum('btkgh,bskh->bkgts', qg, kb, preferred_element_type=jnp.float32)
  return jnp.where(mb[:, None, None], s, _MASKED)


def _flash_forward(qg, k_blocks, v_blocks, m_blocks):
  """Online softmax over key blocks: (out [B, K, G, T, H] float32, log-sum-exp [B, K, G, T])."""
  b, t, kv, g, h = qg.shape

  def step(carry, xs):
    acc, row_max, denom = carry
    kb, vb, mb = xs
    s = _block_scores(qg, kb, mb)
    new_max = jnp.maximum(row_max, s.max(-1))
    correction = jnp.exp(row_max - new_max)
    # Masked keys count zero even while a row has seen no visible key yet (max still -1e30).
    p = jnp.exp(s - new_max[..., None]) * mb[:, None, None]
    acc = acc * correction[..., None] + jnp.einsum(
        'bkgts,bskh->bkgth', p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return (acc, new_max, denom * correction + p.sum(-1)), None

  init = (jnp.zeros((b, kv, g, t, h), jnp.float32), jnp.full((b, kv, g, t), _MASKED, jnp.float32),
          jnp.zeros((b, kv, g, t), jnp.float32))
  (acc, row_max, denom), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, m_blocks))
  denom = jnp.where(denom == 0, 1.0, denom)  # fully masked rows: 0 / 1
  return acc / denom[..., None], row_max + jnp.log(denom)


@jax.custom_vjp
def _flash(qg, k_blocks, v_blocks, m_blocks):
  return _flash_forward(qg, k_blocks, v_blocks, m_blocks)[0]


def _flash_fwd(qg, k_blocks, v_blocks, m_blocks):
  out, lse = _flash_forward(qg, k_blocks, v_blocks, m_blocks)
  return out, (qg, k_blocks, v_blocks, m_blocks, out, lse)


def _flash_bwd(res, d_out):
  """Flash-attention backward: per key block, p = exp(s - lse), ds = p * (dp - rowsum(dO * O))."""
  qg, k_blocks, v_blocks, m_blocks, out, lse = res
  dt = qg.dtype
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G, T]
  d_out_c = d_out.astype(dt)

  def step(dq, xs):
    kb, vb, mb = xs
    p = jnp.exp(_block_scores(qg, kb, mb) - lse[..., None]) * mb[:, None, None]
    dv = jnp.einsum('bkgts,bkgth->bskh', p.astype(dt), d_out_c, preferred_element_type=jnp.float32)
    dp = jnp.einsum('bkgth,bskh->bkgts', d_out_c, vb, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(dt)
    dq = dq + jnp.einsum('bkgts,bskh->btkgh', ds, kb, preferred_element_type=jnp.float32)
    dk = jnp.einsum('bkgts,btkgh->bskh', ds, qg, preferred_element_type=jnp.float32)
    return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32),
                              (k_blocks, v_blocks, m_blocks))
  return dq.astype(dt), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _blocked(q, k, v, mask, block=_KEY_BLOCK):
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  pad = (-s) % block
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
  nb = (s + pad) // block
  to_blocks = lambda x: x.reshape((b, nb, block) + x.shape[2:]).swapaxes(0, 1)
  m_blocks = mask.reshape(b, t, nb, block).transpose(2, 0, 1, 3)
  qg = _grouped(q, kv) * jnp.asarray(h ** -0.5, q.dtype)
  out = _flash(qg, to_blocks(k.astype(q.dtype)), to_blocks(v.astype(q.dtype)), m_blocks)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _cudnn(q, k, v, mask):
  if jax.default_backend() != 'gpu':
    raise UserError("config.model.attention='cudnn' needs a GPU; use 'xla' or 'blocked' on "
                     f'{jax.default_backend()}')
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise UserError("config.model.attention='cudnn' needs config.model.dtype='bfloat16' (cuDNN "
                     f"flash attention has no {q.dtype} kernel); use 'xla' or 'blocked' otherwise")
  # JAX turns the boolean mask into a finite large-negative bias: padding rows stay finite
  # (a uniform average there instead of zeros; their outputs are never used).
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation='cudnn')


_IMPLEMENTATIONS = {'xla': _xla, 'blocked': _blocked, 'cudnn': _cudnn}
# The choices of config.model.attention.
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, implementation: str):
  if implementation not in _IMPLEMENTATIONS:
    raise UserError(f'config.model.attention={implementation!r} is not one of '
                    f'{", ".join(map(repr, IMPLEMENTATIONS))}')
  return _IMPLEMENTATIONS[implementation](q_BTNH, k_BSKH, v_BSKH, mask_BTS)
