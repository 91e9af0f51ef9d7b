"""Log-probabilities of target tokens from final hidden states, chunked over the sequence.

The full [B, T, V] float32 logits are never held: the vocabulary projection, log-softmax and the
target gather run on sequence chunks inside `jax.lax.map`, each chunk rematerialized in the
backward pass, so peak memory grows with B x chunk x V instead of B x T x V (Llama 3: V = 128256).
"""

import jax
import jax.numpy as jnp


def _chunk_logps(hidden_BCD, unembed_DV, targets_BC):
  # Matmul in the compute dtype with float32 accumulation; log-softmax in float32. On [B*C, D]
  # rows (M = B*C): a two-axis contraction in the weight gradient falls off XLA's CPU GEMM path.
  b, c, d = hidden_BCD.shape
  dt = hidden_BCD.dtype
  h_MD = hidden_BCD.reshape(b * c, d)
  # The cast and the target gather act on the head as [V, D] (the embedding's orientation), so
  # its gradient is summed and cast as [V, D]: libtpu then reduce-scatters it to each device's
  # fsdp shard (D). Cast and gathered as [D, V], it all-reduced the whole [D, V] gradient on
  # 4-chip v5p slices for Llama 3's V = 128256 (isdaa_jax.plan; a sharding constraint on the
  # head did not help). The logits keep the 'md,dv' contraction: 'md,vd' also reduce-scatters
  # but makes the CPU backward slower (1.25x in bfloat16).
  w_VD = unembed_DV.T.astype(dt)
  logits_MV = jnp.einsum('md,dv->mv', h_MD, w_VD.T, preferred_element_type=jnp.float32)
  # The target logit as a dot with the target's unembedding row, not a gather from the logits:
  # the gather's backward would scatter into a dense [M, V] zero array.
  w_target_MD = jnp.take(w_VD, targets_BC.reshape(b * c), axis=0)
  target_logit_M = jnp.einsum('md,md->m', h_MD, w_target_MD, preferred_element_type=jnp.float32)
  return (target_logit_M - jax.nn.logsumexp(logits_MV, axis=-1)).reshape(b, c)


def token_logps(hidden_BTD, unembed_DV, targets_BT, chunk_size: int):
  """log p(targets[b, t] | prefix) as float32 [B, T]; chunk_size 0 computes in one piece."""
  b, t, d = hidden_BTD.shape
  if chunk_size <= 0 or t <= chunk_size:
    return _chunk_logps(hidden_BTD, unembed_DV, targets_BT)
  pad = (-t) % chunk_size
  h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  n = (t + pad) // chunk_size
  h_NBCD = h.reshape(b, n, chunk_size, d).swapaxes(0, 1)
  y_NBC = y.reshape(b, n, chunk_size).swapaxes(0, 1)
  # checkpoint: the backward pass recomputes each chunk's logits instead of storing them all.
  chunk_fn = jax.checkpoint(lambda xs: _chunk_logps(xs[0], unembed_DV, xs[1]))
  logps_NBC = jax.lax.map(chunk_fn, (h_NBCD, y_NBC))
  return logps_NBC.swapaxes(0, 1).reshape(b, t + pad)[:, :t]


def sequence_logps(hidden_BTD, unembed_DV, targets_BT, loss_mask_BT, chunk_size: int):
  """Summed log-probs over masked target tokens [B] and the number of those tokens [B]."""
  logps_BT = token_logps(hidden_BTD, unembed_DV, targets_BT, chunk_size)
  mask = loss_mask_BT.astype(jnp.float32)
  return jnp.sum(logps_BT * mask, axis=-1), jnp.sum(mask, axis=-1)
