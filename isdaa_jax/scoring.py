"""Summed response log-probs of tokenized pairs under one model, batched and sharded.

  scores = score_pairs(model, pairs, mesh, layout=layout, batch_size=64, chunk_size=128)

The reusable core of `python -m isdaa_jax.score` and of the cached-reference pre-pass
(`isdaa_jax.reference`). Pairs are grouped by the row length their layout gives them
(`layout.group`), every batch of a group is filled to one shape and runs one jitted, sharded
forward pass, so each group compiles once.
"""

import collections
import dataclasses
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from isdaa_jax import sharding
from isdaa_jax.errors import UserError
from isdaa_jax.layout import Layout


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per pair, float32 [N]: response log-probs summed over tokens, and response token counts."""
  chosen_logps: np.ndarray
  rejected_logps: np.ndarray
  chosen_tokens: np.ndarray
  rejected_tokens: np.ndarray


def _forward(model: nnx.Module, batch: Mapping[str, jax.Array], layout: Layout,
             chunk_size: int) -> dict:
  lp_w, lp_l, n_w, n_l = layout.sequence_logps(model, batch, chunk_size)
  return dict(chosen_logps=lp_w, rejected_logps=lp_l, chosen_tokens=n_w, rejected_tokens=n_l)


def grouped_batches(pairs: Sequence[Mapping], batch_size: int,
                    layout: Layout) -> Iterator[np.ndarray]:
  """Pair indices, at most `batch_size` of one `layout.group` at a time, groups in increasing
  order."""
  by_group = collections.defaultdict(list)
  for i, pair in enumerate(pairs):
    by_group[layout.group(pair)].append(i)
  for group in sorted(by_group):
    idx = np.asarray(by_group[group])
    for start in range(0, len(idx), batch_size):
      yield idx[start:start + batch_size]


def score_pairs(model: nnx.Module, pairs: Sequence[Mapping], mesh: Mesh, *, layout: Layout,
                batch_size: int, chunk_size: int, progress: bool = True,
                desc: str = 'scoring') -> Scores:
  """Summed response log-probs of every tokenized pair under `model` (sharded on `mesh`).

  Batches hold `batch_size` pairs rounded up to a multiple of the data-parallel devices; a short
  batch is filled with copies of its first pair (discarded), so every batch of a group has one
  shape (packed batches: the most rows any batch needs) and compiles once. Every layout gives
  the padded layout's sums up to float rounding.
  """
  n = len(pairs)
  vocab = model.cfg.vocab_size
  for key in ('prompt_ids', 'chosen_ids', 'rejected_ids'):
    top = max((int(np.max(p[key])) for p in pairs if len(p[key])), default=-1)
    if top >= vocab:
      raise UserError(f'the pairs hold token id {top} but the model vocabulary has {vocab} '
                      'entries; tokenize with the model\'s tokenizer (--tokenizer)')
  dp = mesh.shape['data'] * mesh.shape['fsdp']
  rows = -(-batch_size // dp) * dp
  groups = list(grouped_batches(pairs, rows, layout))
  sizes = [len(idx) for idx in groups]
  batches = [np.concatenate([idx, np.full(rows - len(idx), idx[0])]) for idx in groups]
  min_rows = max((layout.num_rows([pairs[i] for i in idx], dp) for idx in batches), default=0)
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, batch: _forward(nnx.merge(graphdef, state), batch, layout,
                                               chunk_size),
                 out_shardings=sharding.replicated(mesh))
  batch_sharding = sharding.batch_sharding(mesh)
  out = {k: np.zeros(n, np.float32) for k in ('chosen_logps', 'rejected_logps', 'chosen_tokens',
                                              'rejected_tokens')}
  show = progress and jax.process_index() == 0
  with tqdm.tqdm(total=n, desc=desc, unit='pair', disable=not show) as bar:
    for idx, size in zip(batches, sizes):
      local = layout.collate([pairs[i] for i in idx], row_multiple=dp, min_rows=min_rows)
      # Every process holds every pair, so each device takes its slice of the global batch.
      batch = {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda s, a=v: a[s])
               for k, v in local.items()}
      result = jax.device_get(step(state, batch))
      for k in out:
        out[k][idx[:size]] = result[k][:size]
      bar.update(size)
  return Scores(**out)
