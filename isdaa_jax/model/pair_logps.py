"""Summed response log-probs of preference pairs under a Llama, for each batch layout.

The device half of `isdaa_jax.layout`: every function takes a model, a batch in the layout's keys
(written on the host by `data/collate.py`, `data/prefix.py` or `data/packing.py`, whose module
docs describe the keys) and the vocabulary chunk of `logprobs.masked_token_logps` (the head runs
on the response positions only), and returns
(lp_w, lp_l, n_w, n_l), each float32 [G]: chosen and rejected log-probs summed over response
tokens, and the token counts.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

from isdaa_jax.data.prefix import PROMPT
from isdaa_jax.model import logprobs


def side(model, batch: Mapping[str, jax.Array], name: str, chunk_size: int):
  """(lp, n), each [B]: one side ('chosen' or 'rejected') of a padded batch."""
  hidden_BTD = model(batch[f'{name}_input_ids'], batch[f'{name}_positions'],
                     batch[f'{name}_segment_ids'])
  return logprobs.sequence_logps(hidden_BTD, model.unembedding(), batch[f'{name}_targets'],
                                 batch[f'{name}_loss_mask'], chunk_size)


def padded(model, batch: Mapping[str, jax.Array], chunk_size: int):
  """Padded rows: chosen and rejected go through the model as one batch of 2B rows."""
  cat = lambda key: jnp.concatenate([batch[f'chosen_{key}'], batch[f'rejected_{key}']], axis=0)
  hidden_BTD = model(cat('input_ids'), cat('positions'), cat('segment_ids'))
  lp, n = logprobs.sequence_logps(hidden_BTD, model.unembedding(), cat('targets'),
                                  cat('loss_mask'), chunk_size)
  b = batch['chosen_input_ids'].shape[0]
  return lp[:b], lp[b:], n[:b], n[b:]


def shared_attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T, T] bool for prefix-shared rows: causal; a key is visible in its own segment or when
  it is a prompt token.

  Padding queries see the prompt (never a fully masked row, which some fused kernels turn into
  NaN); nothing reads their outputs.
  """
  t = segment_ids_BT.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  q, k = segment_ids_BT[:, :, None], segment_ids_BT[:, None, :]
  return causal[None] & (k != 0) & ((k == q) | (k == PROMPT))


def prefix_shared(model, batch: Mapping[str, jax.Array], chunk_size: int):
  """Prefix-shared rows (`data/prefix.py`): one row of prompt, chosen and rejected per pair."""
  seg = batch['shared_segment_ids']
  hidden_BTD = model(batch['shared_input_ids'], batch['shared_positions'], seg,
                     attention_mask_BTT=shared_attention_mask(seg))
  unembed_DV = model.unembedding()
  chosen = batch['shared_chosen_mask'].astype(jnp.float32)
  rejected = batch['shared_rejected_mask'].astype(jnp.float32)
  logps_BT = logprobs.masked_token_logps(hidden_BTD, unembed_DV, batch['shared_targets'],
                                         (chosen + rejected) > 0, chunk_size)
  # l_0 is predicted by the last prompt token, whose own target slot predicts w_0.
  last_B1D = jnp.take_along_axis(hidden_BTD, batch['shared_prompt_last'][:, None, None], axis=1)
  first_B = logprobs.token_logps(last_B1D, unembed_DV, batch['shared_rejected_first'][:, None],
                                 0)[:, 0]
  first_mask = batch['shared_rejected_first_mask'].astype(jnp.float32)
  lp_w = jnp.sum(logps_BT * chosen, axis=-1)
  lp_l = jnp.sum(logps_BT * rejected, axis=-1) + first_B * first_mask
  return lp_w, lp_l, jnp.sum(chosen, axis=-1), jnp.sum(rejected, axis=-1) + first_mask


def packed_attention_mask(segment_ids_BT: jax.Array, roles_BT: jax.Array) -> jax.Array:
  """[B, T, T] bool for packed rows: causal, within a unit, and onto the key's own role or the
  prompt.

  Padding queries see the row's first key (never a fully masked row, which some fused kernels
  turn into NaN); nothing reads their outputs.
  """
  t = segment_ids_BT.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  seg_q, seg_k = segment_ids_BT[:, :, None], segment_ids_BT[:, None, :]
  role_q, role_k = roles_BT[:, :, None], roles_BT[:, None, :]
  visible = (seg_k == seg_q) & (seg_k != 0) & ((role_k == role_q) | (role_k == PROMPT))
  padding_query = (seg_q == 0) & (jnp.arange(t)[None, None, :] == 0)
  return causal[None] & (visible | padding_query)


def packed(model, batch: Mapping[str, jax.Array], chunk_size: int):
  """Packed rows (`data/packing.py`): R rows of T tokens holding the units of G pairs."""
  seg, roles = batch['packed_segment_ids'], batch['packed_roles']
  hidden_RTD = model(batch['packed_input_ids'], batch['packed_positions'], seg,
                     attention_mask_BTT=packed_attention_mask(seg, roles))
  unembed_DV = model.unembedding()
  g = batch['packed_rejected_first'].shape[0]
  # Pair index g marks the positions that belong to no pair's response.
  scored_RT = (batch['packed_chosen_pair'] != g) | (batch['packed_rejected_pair'] != g)
  logps_RT = logprobs.masked_token_logps(hidden_RTD, unembed_DV, batch['packed_targets'],
                                         scored_RT, chunk_size)

  def per_pair(values, pair_ids):
    # Index g collects the positions that belong to no pair; it is dropped.
    return jax.ops.segment_sum(values.reshape(-1), pair_ids.reshape(-1), num_segments=g + 1)[:g]

  ones = jnp.ones_like(logps_RT)
  r, t, d = hidden_RTD.shape
  last_G1D = jnp.take(hidden_RTD.reshape(r * t, d), batch['packed_rejected_first_index'],
                      axis=0)[:, None]
  first_G = logprobs.token_logps(last_G1D, unembed_DV, batch['packed_rejected_first'][:, None],
                                 0)[:, 0]
  first_mask = batch['packed_rejected_first_mask'].astype(jnp.float32)
  lp_w = per_pair(logps_RT, batch['packed_chosen_pair'])
  lp_l = per_pair(logps_RT, batch['packed_rejected_pair']) + first_G * first_mask
  n_w = per_pair(ones, batch['packed_chosen_pair'])
  n_l = per_pair(ones, batch['packed_rejected_pair']) + first_mask
  return lp_w, lp_l, n_w, n_l
