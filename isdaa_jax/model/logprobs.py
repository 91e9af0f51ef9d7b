"""Log-probabilities of target tokens from final hidden states, chunked over the sequence.

The full [B, T, V] float32 logits are never held: the vocabulary projection, log-softmax and the
target gather run on sequence chunks inside `jax.lax.map`, each chunk rematerialized in the
backward pass, so peak memory grows with B x chunk x V instead of B x T x V (Llama 3: V = 128256).

`masked_token_logps` runs the vocabulary head only where a loss reads it: the masked positions
are gathered to the front (per data-parallel row group) and the chunks past them are skipped, so
the head costs the response tokens, not the prompts and padding (HH-RLHF: ~30% of the positions).
"""

import math

import jax
import jax.numpy as jnp

from isdaa_jax.model.llama import data_parallel_axes


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


def _row_groups(rows: int) -> int:
  """How many groups the rows split into for gathering: one per data-parallel shard of the mesh
  in context (each device then gathers its own rows, no communication), else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  shards = math.prod(mesh.shape[a] for a in data_parallel_axes(mesh))
  return math.gcd(rows, shards)


def masked_token_logps(hidden_BTD, unembed_DV, targets_BT, mask_BT, chunk_size: int):
  """`token_logps` where `mask_BT` is true and 0 elsewhere; the head runs on the masked positions.

  Each row group (`_row_groups`) stably sorts its masked positions first; the vocabulary head
  then runs on chunks of B x chunk_size sorted positions (the same memory bound as
  `token_logps`) and a chunk past every group's masked count is skipped by `lax.cond`, in the
  forward and backward passes alike. chunk_size 0: the whole head at once, nothing skipped.
  """
  b, t, d = hidden_BTD.shape
  if chunk_size <= 0 or t <= chunk_size:
    logps_BT = token_logps(hidden_BTD, unembed_DV, targets_BT, chunk_size)
    return jnp.where(mask_BT, logps_BT, 0.0)
  g = _row_groups(b)
  n = b * t // g
  per_chunk = b // g * chunk_size  # positions of one group in one chunk
  pad = (-n) % per_chunk
  mask_GN = mask_BT.reshape(g, n).astype(bool)
  # Stable: masked positions keep their order, so a group's sorted positions are its own rows'.
  order_GN = jnp.argsort(~mask_GN, axis=1, stable=True)
  count_G = jnp.sum(mask_GN, axis=1)
  h_GND = jnp.take_along_axis(hidden_BTD.reshape(g, n, d), order_GN[..., None], axis=1)
  y_GN = jnp.take_along_axis(targets_BT.reshape(g, n), order_GN, axis=1)
  h_GND = jnp.pad(h_GND, ((0, 0), (0, pad), (0, 0)))
  y_GN = jnp.pad(y_GN, ((0, 0), (0, pad)))
  chunks = (n + pad) // per_chunk
  h_KGCD = h_GND.reshape(g, chunks, per_chunk, d).swapaxes(0, 1)
  y_KGC = y_GN.reshape(g, chunks, per_chunk).swapaxes(0, 1)
  needed = jnp.max(count_G)

  def chunk_fn(xs):
    k, h_GCD, y_GC = xs
    return jax.lax.cond(k * per_chunk < needed,
                        lambda: _chunk_logps(h_GCD, unembed_DV, y_GC),
                        lambda: jnp.zeros(y_GC.shape, jnp.float32))

  logps_KGC = jax.lax.map(jax.checkpoint(chunk_fn), (jnp.arange(chunks), h_KGCD, y_KGC))
  sorted_GN = logps_KGC.swapaxes(0, 1).reshape(g, n + pad)[:, :n]
  logps_GN = jnp.take_along_axis(sorted_GN, jnp.argsort(order_GN, axis=1), axis=1)
  return jnp.where(mask_BT, logps_GN.reshape(b, t), 0.0)


def sequence_logps(hidden_BTD, unembed_DV, targets_BT, loss_mask_BT, chunk_size: int):
  """Summed log-probs over masked target tokens [B] and the number of those tokens [B]."""
  # Already 0 off the mask: summed as they are.
  logps_BT = masked_token_logps(hidden_BTD, unembed_DV, targets_BT, loss_mask_BT, chunk_size)
  return jnp.sum(logps_BT, axis=-1), jnp.sum(loss_mask_BT.astype(jnp.float32), axis=-1)
