"""Fixed-shape batches from tokenized preference pairs.

A tokenized pair is a mapping with 1-D integer sequences `prompt_ids`, `chosen_ids`,
`rejected_ids` (the responses already end with EOS) and optionally the float scalars named in
`LOGP_COLUMNS`. Every consumer (the train step, `isdaa_jax.score`, the lab) sees the same layout:

  {side}_input_ids   [B, T] int32  prompt + response, then padding
  {side}_targets     [B, T] int32  input_ids shifted left by one (the token each position predicts)
  {side}_loss_mask   [B, T] int32  1 where targets[t] is a response token
  {side}_positions   [B, T] int32  0, 1, 2, ... over real tokens, 0 on padding
  {side}_segment_ids [B, T] int32  1 on real tokens, 0 on padding

for side in ('chosen', 'rejected'), plus `{column}` [B] float32 for each log-prob column present
in every pair.
"""

from typing import Mapping, Sequence

import numpy as np

SIDES = ('chosen', 'rejected')
LOGP_COLUMNS = (
    'behavior_chosen_logps',
    'behavior_rejected_logps',
    'reference_chosen_logps',
    'reference_rejected_logps',
)
PAD_ID = 0


def pair_length(pair: Mapping) -> int:
  """Longest of prompt+chosen and prompt+rejected."""
  n_prompt = len(pair['prompt_ids'])
  return n_prompt + max(len(pair['chosen_ids']), len(pair['rejected_ids']))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """Smallest bucket that holds `length`; a pair longer than all buckets is a caller error."""
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(
      f'a pair of {length} tokens is longer than the largest length bucket {max(buckets)}; '
      'raise data.length_buckets or lower data.max_length')


def side_arrays(prompt: np.ndarray, response: np.ndarray, seq_len: int) -> dict:
  """One side's [seq_len] arrays of the layout in the module doc."""
  if len(prompt) < 1:
    raise ValueError('a pair needs at least one prompt token (e.g. BOS) to predict the first '
                     'response token from')
  seq = np.concatenate([prompt, response]).astype(np.int32)
  n = seq.shape[0]
  if n > seq_len:
    raise ValueError(f'sequence of {n} tokens does not fit length {seq_len}')
  input_ids = np.full(seq_len, PAD_ID, np.int32)
  input_ids[:n] = seq
  targets = np.full(seq_len, PAD_ID, np.int32)
  targets[:n - 1] = seq[1:]
  loss_mask = np.zeros(seq_len, np.int32)
  # Position t predicts token t+1: response tokens sit at P..n-1, so predictions come from P-1..n-2.
  loss_mask[len(prompt) - 1:n - 1] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[:n] = np.arange(n, dtype=np.int32)
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:n] = 1
  return dict(input_ids=input_ids, targets=targets, loss_mask=loss_mask,
              positions=positions, segment_ids=segment_ids)


def collate_pairs(pairs: Sequence[Mapping], seq_len: int) -> dict[str, np.ndarray]:
  """Stacks tokenized pairs into the fixed-shape batch layout described in the module doc."""
  if not pairs:
    raise ValueError('collate_pairs needs at least one pair')
  rows = {}
  for side in SIDES:
    per_pair = []
    for p in pairs:
      per_pair.append(side_arrays(np.asarray(p['prompt_ids'], np.int32),
                                  np.asarray(p[f'{side}_ids'], np.int32), seq_len))
    for key in per_pair[0]:
      rows[f'{side}_{key}'] = np.stack([a[key] for a in per_pair])
  for col in LOGP_COLUMNS:
    if all(col in p and p[col] is not None for p in pairs):
      rows[col] = np.asarray([p[col] for p in pairs], np.float32)
  return rows
