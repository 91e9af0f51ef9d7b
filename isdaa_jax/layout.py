"""How a batch of preference pairs is laid out: chosen once from `config.data`, used everywhere.

  layout = layout_lib.from_config(config.data)
  batch = layout.collate(pairs_G, start, stop, micro_batches=n, row_multiple=dp)   # host, numpy
  lp_w, lp_l, n_w, n_l = layout.sequence_logps(model, batch, chunk_size)          # device, jit

Three kinds, each a frozen (hashable) dataclass that the jitted step holds as a static field:
  Padded        one row per sequence, padded to the smallest of `buckets` that holds the batch
                (`data/collate.py`)
  PrefixShared  one row per pair holding prompt, chosen and rejected, so the prompt runs once
                (`data/prefix.py`)
  Packed        the batch's sequences (or prefix-shared rows) end to end in rows of `length`
                tokens (`data/packing.py`)
The host halves live in `data/`, the device halves in `model/pair_logps.py`; every layout gives
the log-probs of the padded layout up to float rounding. Consumers (the input pipeline, the train
step, `isdaa_jax.score`, the reference pre-pass, the benchmarks) receive a layout and never look
at batch keys to find out which one they have.
"""

import dataclasses
from typing import Mapping, Sequence

import jax.numpy as jnp

from isdaa_jax.data import collate, packing, prefix
from isdaa_jax.model import pair_logps

KINDS = ('padded', 'prefix_shared', 'packed')


class Layout:
  """The interface every layout implements."""

  def group(self, pair: Mapping) -> int:
    """The row length `pair` needs on its own: pairs of one group batch into one shape."""
    raise NotImplementedError

  def collate(self, pairs: Sequence[Mapping], start: int = 0, stop: int | None = None, *,
              micro_batches: int = 1, row_multiple: int = 1, min_rows: int = 0,
              min_length: int = 0) -> dict:
    """This process's share (pairs [start, stop)) of the global batch `pairs`, as numpy arrays
    whose shapes every process agrees on. `micro_batches` and `row_multiple` (the step's
    accumulation and the data-parallel devices) and `min_rows` concern packed rows only;
    `min_length` (padded and shared rows) pads to at least that length. The last two give many
    batches one shape (one compilation)."""
    raise NotImplementedError

  def num_rows(self, pairs: Sequence[Mapping], row_multiple: int = 1) -> int:
    """Rows the batch `pairs` (one micro-batch) takes; `collate(..., min_rows=)` of the largest
    over several batches gives them all one shape."""
    raise NotImplementedError

  def sequence_logps(self, model, batch, chunk_size: int):
    """(lp_w, lp_l, n_w, n_l), each [G], on the device."""
    raise NotImplementedError

  def real_tokens(self, batch):
    """Tokens the model runs on (padding excluded), on the device."""
    raise NotImplementedError

  def row_tokens(self, batch) -> int:
    """Positions the model runs on, padding included (rows x row length)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Padded(Layout):
  buckets: tuple[int, ...]

  def group(self, pair):
    return collate.bucket_for(collate.pair_length(pair), self.buckets)

  def collate(self, pairs, start=0, stop=None, *, micro_batches=1, row_multiple=1, min_rows=0,
              min_length=0):
    del micro_batches, row_multiple, min_rows
    seq_len = max([min_length] + [self.group(p) for p in pairs])
    return collate.collate_pairs(list(pairs[start:stop]), seq_len)

  def num_rows(self, pairs, row_multiple=1):
    return 2 * len(pairs)

  def sequence_logps(self, model, batch, chunk_size):
    return pair_logps.padded(model, batch, chunk_size)

  def real_tokens(self, batch):
    return jnp.sum(batch['chosen_segment_ids'] > 0) + jnp.sum(batch['rejected_segment_ids'] > 0)

  def row_tokens(self, batch):
    return batch['chosen_input_ids'].size + batch['rejected_input_ids'].size


@dataclasses.dataclass(frozen=True)
class PrefixShared(Layout):
  buckets: tuple[int, ...]  # the unshared buckets; rows take these and their doubles

  def group(self, pair):
    return collate.bucket_for(prefix.shared_length(pair), prefix.shared_buckets(self.buckets))

  def collate(self, pairs, start=0, stop=None, *, micro_batches=1, row_multiple=1, min_rows=0,
              min_length=0):
    del micro_batches, row_multiple, min_rows
    seq_len = max([min_length] + [self.group(p) for p in pairs])
    return prefix.collate_shared(list(pairs[start:stop]), seq_len)

  def num_rows(self, pairs, row_multiple=1):
    return len(pairs)

  def sequence_logps(self, model, batch, chunk_size):
    return pair_logps.prefix_shared(model, batch, chunk_size)

  def real_tokens(self, batch):
    return jnp.sum(batch['shared_segment_ids'] > 0)

  def row_tokens(self, batch):
    return batch['shared_input_ids'].size


@dataclasses.dataclass(frozen=True)
class Packed(Layout):
  length: int  # tokens per packed row
  shared: bool  # units are prefix-shared rows, else single sequences

  def group(self, pair):
    return self.length  # every pair packs into rows of one length

  def collate(self, pairs, start=0, stop=None, *, micro_batches=1, row_multiple=1, min_rows=0,
              min_length=0):
    del min_length  # rows are always `length` long
    # Every process packs the whole global batch alike and keeps its share of rows and pairs.
    batch = packing.collate_packed(list(pairs), self.length, shared=self.shared,
                                   micro_batches=micro_batches, row_multiple=row_multiple,
                                   min_rows=min_rows)
    stop = len(pairs) if stop is None else stop
    if (start, stop) == (0, len(pairs)):
      return batch
    return packing.local_rows(batch, start, stop, len(pairs))

  def num_rows(self, pairs, row_multiple=1):
    need = packing.rows_needed(list(pairs), self.length, self.shared)
    return -(-need // row_multiple) * row_multiple

  def sequence_logps(self, model, batch, chunk_size):
    return pair_logps.packed(model, batch, chunk_size)

  def real_tokens(self, batch):
    return jnp.sum(batch['packed_segment_ids'] > 0)

  def row_tokens(self, batch):
    return batch['packed_input_ids'].size


def pack_length(data) -> int:
  """Row length of packed batches: `data.pack_length`, else the largest bucket of the layout."""
  buckets = tuple(data.length_buckets)
  return data.pack_length or max(prefix.shared_buckets(buckets) if data.prefix_sharing
                                 else buckets)


def from_config(data) -> Layout:
  """The layout `config.data` asks for (`packing`, `prefix_sharing`, `length_buckets`)."""
  buckets = tuple(data.length_buckets)
  if data.packing:
    return Packed(length=pack_length(data), shared=data.prefix_sharing)
  if data.prefix_sharing:
    return PrefixShared(buckets)
  return Padded(buckets)
