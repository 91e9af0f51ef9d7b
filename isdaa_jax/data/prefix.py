"""Prefix-shared pair rows: prompt, chosen and rejected in one row, so the prompt runs once.

With `config.data.prefix_sharing` each pair (prompt of P tokens, responses of Rw and Rl tokens)
becomes one row of P + Rw + Rl real tokens instead of two rows of P + Rw and P + Rl:

  tokens     x_0 .. x_{P-1}  w_0 .. w_{Rw-1}  l_0 .. l_{Rl-1}  padding
  positions  0 .. P-1        P .. P+Rw-1      P .. P+Rl-1      0
  segments   1 (PROMPT)      2 (CHOSEN)       3 (REJECTED)     0

Batch keys: [B, T] int32 `shared_input_ids`, `shared_positions`, `shared_segment_ids`,
`shared_targets` (the token each position predicts within its own sequence),
`shared_chosen_mask` (positions predicting w_0 .. w_{Rw-1}), `shared_rejected_mask` (positions
predicting l_1 .. l_{Rl-1}); [B] int32 `shared_prompt_last` (index P-1), `shared_rejected_first`
(l_0) and `shared_rejected_first_mask` (0 for an empty rejected response); plus the [B] float32
log-prob columns of `collate.LOGP_COLUMNS`.

Attention (`model/pair_logps.shared_attention_mask`) is causal and lets a token see its own segment and the prompt only:
the rejected tokens never see the chosen ones, and with positions restarting after the prompt
every response token computes what it computes in its own unshared row. The one prediction a
row cannot hold is l_0: it comes from the last prompt token, whose target slot already predicts
w_0, so `model/pair_logps.prefix_shared` scores it from that position's hidden state separately.
"""

from typing import Mapping, Sequence

import numpy as np

from isdaa_jax.data import collate

PROMPT, CHOSEN, REJECTED = 1, 2, 3


def shared_length(pair: Mapping) -> int:
  """Real tokens of the pair's shared row: P + Rw + Rl."""
  return len(pair['prompt_ids']) + len(pair['chosen_ids']) + len(pair['rejected_ids'])


def shared_buckets(length_buckets: Sequence[int]) -> tuple[int, ...]:
  """Row lengths for shared rows: the unshared buckets and their doubles (a shared row is
  shorter than twice its pair's unshared length)."""
  return tuple(sorted(set(length_buckets) | {2 * b for b in length_buckets}))


def pair_row(pair: Mapping, seq_len: int) -> dict:
  """One pair's shared row padded to `seq_len`: [seq_len] arrays (`segment_ids` holds the roles
  PROMPT/CHOSEN/REJECTED) and the scalars `prompt_last`, `rejected_first`, `rejected_first_mask`."""
  prompt = np.asarray(pair['prompt_ids'], np.int32)
  chosen = np.asarray(pair['chosen_ids'], np.int32)
  rejected = np.asarray(pair['rejected_ids'], np.int32)
  p, rw, rl = len(prompt), len(chosen), len(rejected)
  if p < 1:
    raise ValueError('a pair needs at least one prompt token (e.g. BOS) to predict the first '
                     'response token from')
  n = p + rw + rl
  if n > seq_len:
    raise ValueError(f'a shared row of {n} tokens does not fit length {seq_len}')
  row = {k: np.zeros(seq_len, np.int32) for k in ('input_ids', 'positions', 'segment_ids',
                                                  'targets', 'chosen_mask', 'rejected_mask')}
  row['input_ids'][:n] = np.concatenate([prompt, chosen, rejected])
  row['positions'][:n] = np.concatenate([np.arange(p + rw), np.arange(p, p + rl)])
  row['segment_ids'][:n] = np.repeat([PROMPT, CHOSEN, REJECTED], [p, rw, rl])
  # Prompt and chosen form one causal sequence: position t predicts t+1 up to the last chosen
  # token, which predicts nothing.
  row['targets'][:p + rw - 1] = row['input_ids'][1:p + rw]
  row['chosen_mask'][p - 1:p + rw - 1] = 1
  # Rejected token j predicts rejected token j+1; l_0 is predicted from the prompt's last token.
  if rl > 1:
    row['targets'][p + rw:n - 1] = rejected[1:]
    row['rejected_mask'][p + rw:n - 1] = 1
  row['prompt_last'] = p - 1
  row['rejected_first'] = int(rejected[0]) if rl else 0
  row['rejected_first_mask'] = int(rl > 0)
  return row


def collate_shared(pairs: Sequence[Mapping], seq_len: int) -> dict[str, np.ndarray]:
  """Stacks tokenized pairs into the prefix-shared batch layout of the module doc."""
  if not pairs:
    raise ValueError('collate_shared needs at least one pair')
  rows = [pair_row(p, seq_len) for p in pairs]
  out = {f'shared_{k}': np.stack([np.asarray(r[k], np.int32) for r in rows]) for k in rows[0]}
  for col in collate.LOGP_COLUMNS:
    if all(col in p and p[col] is not None for p in pairs):
      out[col] = np.asarray([p[col] for p in pairs], np.float32)
  return out
