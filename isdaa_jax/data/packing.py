"""Padding-free packing: the sequences of several pairs laid end to end in rows of fixed length.

With `config.data.packing` a batch of G pairs becomes R rows of T tokens (`data.pack_length`)
holding *units*: a pair's prefix-shared row (prompt, chosen, rejected; `prefix.py`) with
`data.prefix_sharing`, else its two sequences prompt + chosen and prompt + rejected, which may
land in different rows. Units are placed first-fit in decreasing length, so padding is only what
is left at the end of a row; positions restart in every unit. R is the fewest rows first-fit
needs, rounded up to `row_multiple` (the data-parallel devices): batches of one R share one
compiled step.

Batch keys ([R, T] int32 unless noted):
  packed_input_ids, packed_positions, packed_targets (the token each position predicts within its
      own unit's sequence), packed_segment_ids (1, 2, ... per unit in a row; 0 = padding),
  packed_roles        prefix.PROMPT / CHOSEN / REJECTED per token of a shared unit; CHOSEN or
                      REJECTED for every token of an unshared sequence (its prompt included),
  packed_chosen_pair  index in [0, G) of the pair whose chosen log-prob this position's
                      prediction belongs to; G where none (likewise packed_rejected_pair),
  [G] packed_rejected_first_index  flat index r * T + t of a shared unit's last prompt token,
      which also predicts the rejected response's first token (0 and mask 0 when unshared),
  [G] packed_rejected_first, packed_rejected_first_mask,
  [G] float32 log-prob columns of `collate.LOGP_COLUMNS`.

Attention (`model/pair_logps.packed_attention_mask`): causal, within a unit, and from a response only to its own role or
the prompt: the prefix-shared rule per unit, and plain causal attention in an unshared sequence.

Gradient accumulation (`micro_batches` = n): micro-batch i takes pairs i, i+n, ... (the train
step's strided split) and is packed on its own into R/n rows; global row r*n + i is its row r and
global pair k*n + i its pair k, so the step's `_split_micro` recovers each micro-batch with pair
indices and flat indices local to it.
"""

from typing import Mapping, Sequence

import numpy as np

from isdaa_jax.data import collate, prefix

_ROW_KEYS = ('input_ids', 'positions', 'targets', 'segment_ids', 'roles', 'chosen_pair',
             'rejected_pair')


def unit_lengths(pair: Mapping, shared: bool) -> tuple[int, ...]:
  """Tokens of the pair's units: (P + Rw + Rl,) shared, (P + Rw, P + Rl) unshared."""
  p = len(pair['prompt_ids'])
  if shared:
    return (prefix.shared_length(pair),)
  return (p + len(pair['chosen_ids']), p + len(pair['rejected_ids']))


def _units(pair: Mapping, k: int, num_pairs: int, shared: bool) -> list[dict]:
  """The pair's units as dicts of unpadded arrays; pair fields use index k (`num_pairs` = none)."""
  if shared:
    n = prefix.shared_length(pair)
    r = prefix.pair_row(pair, n)
    unit = dict(input_ids=r['input_ids'], positions=r['positions'], targets=r['targets'],
                roles=r['segment_ids'],
                chosen_pair=np.where(r['chosen_mask'] > 0, k, num_pairs),
                rejected_pair=np.where(r['rejected_mask'] > 0, k, num_pairs),
                first=(k, r['prompt_last'], r['rejected_first'], r['rejected_first_mask']))
    return [unit]
  prompt = np.asarray(pair['prompt_ids'], np.int32)
  units = []
  for role, side in ((prefix.CHOSEN, 'chosen'), (prefix.REJECTED, 'rejected')):
    response = np.asarray(pair[f'{side}_ids'], np.int32)
    n = prompt.shape[0] + response.shape[0]
    a = collate.side_arrays(prompt, response, n)
    scored = np.where(a['loss_mask'] > 0, k, num_pairs)
    none = np.full(n, num_pairs)
    units.append(dict(input_ids=a['input_ids'], positions=a['positions'], targets=a['targets'],
                      roles=np.full(n, role, np.int32),
                      chosen_pair=scored if side == 'chosen' else none,
                      rejected_pair=scored if side == 'rejected' else none, first=None))
  return units


def _first_fit(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
  """Unit indices per row: first fit, longest first (ties in input order)."""
  rows, free = [], []
  for u in sorted(range(len(lengths)), key=lambda u: -lengths[u]):
    if lengths[u] > pack_length:
      raise ValueError(f'a packed unit of {lengths[u]} tokens does not fit '
                       f'config.data.pack_length={pack_length}; raise it')
    for r, space in enumerate(free):
      if lengths[u] <= space:
        rows[r].append(u)
        free[r] -= lengths[u]
        break
    else:
      rows.append([u])
      free.append(pack_length - lengths[u])
  return rows


def rows_needed(pairs: Sequence[Mapping], pack_length: int, shared: bool) -> int:
  """Rows first-fit needs for `pairs` (one micro-batch)."""
  lengths = [n for p in pairs for n in unit_lengths(p, shared)]
  return len(_first_fit(lengths, pack_length))


def _pack_micro(pairs: Sequence[Mapping], pack_length: int, num_rows: int, shared: bool) -> dict:
  """One micro-batch packed into exactly `num_rows` rows, pair indices local to it."""
  g = len(pairs)
  units = [u for k, p in enumerate(pairs) for u in _units(p, k, g, shared)]
  layout = _first_fit([len(u['input_ids']) for u in units], pack_length)
  if len(layout) > num_rows:
    raise ValueError(f'{len(layout)} packed rows needed, only {num_rows} given')
  out = {key: np.zeros((num_rows, pack_length), np.int32) for key in _ROW_KEYS}
  out['chosen_pair'][:] = g
  out['rejected_pair'][:] = g
  first = {key: np.zeros(g, np.int32) for key in ('rejected_first_index', 'rejected_first',
                                                  'rejected_first_mask')}
  for r, row_units in enumerate(layout):
    start = 0
    for segment, u in enumerate(sorted(row_units), start=1):  # input order within a row
      unit = units[u]
      stop = start + len(unit['input_ids'])
      for key in _ROW_KEYS:
        if key != 'segment_ids':
          out[key][r, start:stop] = unit[key]
      out['segment_ids'][r, start:stop] = segment
      if unit['first'] is not None:
        k, prompt_last, token, mask = unit['first']
        first['rejected_first_index'][k] = r * pack_length + start + prompt_last
        first['rejected_first'][k] = token
        first['rejected_first_mask'][k] = mask
      start = stop
  out.update(first)
  return out


def collate_packed(pairs: Sequence[Mapping], pack_length: int, *, shared: bool,
                   micro_batches: int = 1, row_multiple: int = 1,
                   min_rows: int = 0) -> dict[str, np.ndarray]:
  """The global batch of `pairs` in the packed layout of the module doc (all rows, all pairs);
  each micro-batch gets at least `min_rows` rows (a shape fixed across batches, for benchmarks)."""
  if not pairs:
    raise ValueError('collate_packed needs at least one pair')
  n = micro_batches
  if len(pairs) % n:
    raise ValueError(f'{len(pairs)} pairs do not split into {n} micro-batches')
  micro = [list(pairs[i::n]) for i in range(n)]
  need = max([min_rows] + [rows_needed(m, pack_length, shared) for m in micro])
  num_rows = -(-need // row_multiple) * row_multiple
  packed = [_pack_micro(m, pack_length, num_rows, shared) for m in micro]
  # Interleave: global row r*n + i = micro-batch i's row r; global pair k*n + i = its pair k.
  out = {f'packed_{key}': np.stack([p[key] for p in packed], axis=1).reshape(
      (-1,) + packed[0][key].shape[1:]) for key in packed[0]}
  for col in collate.LOGP_COLUMNS:
    if all(col in p and p[col] is not None for p in pairs):
      out[col] = np.asarray([p[col] for p in pairs], np.float32)
  return out


def local_rows(batch: Mapping[str, np.ndarray], start: int, stop: int,
               batch_size: int) -> dict[str, np.ndarray]:
  """This process's share of a global packed batch: pairs [start, stop) of `batch_size` and the
  same fraction of the rows (contiguous, so the processes' rows assemble into the global array)."""
  num_rows = batch['packed_input_ids'].shape[0]
  if (num_rows * start) % batch_size:
    raise ValueError(f'{num_rows} packed rows do not split over the processes; packing rounds rows '
                     'to the data-parallel size, which must be a multiple of the process count')
  r0, r1 = num_rows * start // batch_size, num_rows * stop // batch_size
  row_keys = {f'packed_{key}' for key in _ROW_KEYS}
  return {k: v[r0:r1] if k in row_keys else v[start:stop] for k, v in batch.items()}
