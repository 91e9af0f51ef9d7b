"""The Grain input pipeline: parsed, tokenized pairs to fixed-shape, per-process local batches.

  data = pipeline.load(config.data, model_path=config.model.path, vocab_size=V)
  layout = isdaa_jax.layout.from_config(config.data)        # padded, prefix-shared or packed
  it = pipeline.train_iterator(data.train, config.data, layout)   # dicts of numpy arrays
  state = it.get_state(); ...; it.set_state(state)           # saved with the checkpoint
  for batch in pipeline.eval_iterator(data.eval, config.data, layout): ...   # when data.eval is not None
  data.summary   # {'train': {'rows', 'kept', 'dropped': {reason: n}, 'truncated': {...}}, 'eval': ...}

Every process parses and tokenizes the whole split (so drop counts are global and every process
holds the same pairs), then walks the same global batches: a shuffle of the pair indices per
epoch (seed `shuffle_seed`, reshuffled each epoch by Grain), cut into global batches of
`batch_size`. Process p of n takes rows [p*B/n, (p+1)*B/n) of each global batch, and all of them
pad to the bucket that fits the longest pair of the *global* batch, so the processes' local
batches always assemble into one global array. The last incomplete global batch is dropped.
"""

import collections
import copy
import dataclasses
from typing import Iterator, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

from isdaa_jax.data import collate, sources
from isdaa_jax.data.sources import DataSourceError
from isdaa_jax.data.tokenize import PairTokenizer

_IDS = ('prompt_ids', 'chosen_ids', 'rejected_ids')
_CHUNK = 1024  # pairs tokenized per call (fast tokenizers batch in Rust)


class PairStore:
  """Tokenized pairs packed into flat int32 arrays: small, and cheap to pickle to workers."""

  def __init__(self, pairs: Sequence[Mapping]):
    self._offsets, self._tokens = {}, {}
    for key in _IDS:
      lengths = np.asarray([len(p[key]) for p in pairs], np.int64)
      self._offsets[key] = np.concatenate([[0], np.cumsum(lengths)])
      self._tokens[key] = (np.concatenate([np.asarray(p[key], np.int32) for p in pairs])
                           if pairs else np.zeros(0, np.int32))
    self.columns = {}
    for col in collate.LOGP_COLUMNS:
      have = sum(col in p for p in pairs)
      if 0 < have < len(pairs):
        raise DataSourceError(f"'{col}' is given for {have} of {len(pairs)} pairs; give log-probs "
                              'for every row or for none')
      if have:
        self.columns[col] = np.asarray([p[col] for p in pairs], np.float32)
    n = {key: np.diff(off) for key, off in self._offsets.items()}
    # What collate.pair_length computes, for every pair at once.
    self.lengths = n['prompt_ids'] + np.maximum(n['chosen_ids'], n['rejected_ids'])

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, i: int) -> dict:
    pair = {key: self._tokens[key][self._offsets[key][i]:self._offsets[key][i + 1]]
            for key in _IDS}
    pair.update({col: float(v[i]) for col, v in self.columns.items()})
    return pair

  def with_columns(self, columns: Mapping[str, np.ndarray]) -> 'PairStore':
    """A new store with the same pairs and these float32 [N] log-prob columns added (or
    replaced); this one is left as it is."""
    for name, values in columns.items():
      if name not in collate.LOGP_COLUMNS or np.shape(values) != (len(self),):
        raise ValueError(f'column {name!r} of shape {np.shape(values)} is not a log-prob column '
                         f'of {len(self)} pairs')
    new = copy.copy(self)
    new.columns = {**self.columns, **{k: np.asarray(v, np.float32) for k, v in columns.items()}}
    return new

  def subset(self, indices: Sequence[int]) -> 'PairStore':
    return PairStore([self[int(i)] for i in indices])

  def max_token_id(self) -> int:
    return max((int(t.max()) for t in self._tokens.values() if t.size), default=-1)


@dataclasses.dataclass
class SplitStats:
  rows: int = 0
  kept: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def as_dict(self) -> dict:
    return dict(rows=self.rows, kept=self.kept, dropped=dict(sorted(self.dropped.items())),
                truncated=dict(sorted(self.truncated.items())))


@dataclasses.dataclass
class Example:
  """One source row after parsing and tokenization; `pair` is the tokenized dict or None."""
  index: int
  parsed: sources.TextPair | sources.IdPair | None
  pair: dict | None
  reason: str | None


def examples(rows: Sequence[Mapping], source: str, tokenizer: PairTokenizer, where: str,
             limit: int, stats: SplitStats) -> Iterator[Example]:
  """Parses and tokenizes `rows` in order, counting into `stats`; stops after `limit` kept pairs
  (0 = no limit)."""
  parse = sources.PARSERS[source]
  n = len(rows)
  for start in range(0, n, _CHUNK):
    batch = []
    for i in range(start, min(start + _CHUNK, n)):
      row = rows[i]
      if not isinstance(row, Mapping):
        raise sources.MalformedRowError(f'row {i} of {where} is a {type(row).__name__}, not an '
                                        'object; write one {"column": value, ...} per row')
      try:
        parsed = parse(row)
      except sources.MalformedRowError as e:
        raise sources.MalformedRowError(f'row {i} of {where} is malformed: {e}') from None
      if not isinstance(parsed, str):
        parsed = sources.logps_problem(parsed.logps) or parsed
      batch.append((i, parsed))
    parsed = [p for _, p in batch if not isinstance(p, str)]
    tokenized = iter(zip(tokenizer(parsed), tokenizer.cuts))
    for i, p in batch:
      result, cuts = (p, (False, False)) if isinstance(p, str) else next(tokenized)
      stats.rows += 1
      if isinstance(result, str):
        stats.dropped[result] += 1
        yield Example(i, None if isinstance(p, str) else p, None, result)
        continue
      stats.kept += 1
      stats.truncated['prompt'] += cuts[0]
      stats.truncated['response'] += cuts[1]
      yield Example(i, p, result, None)
      if limit and stats.kept >= limit:
        return


def _load_split(rows, data, tokenizer, where, limit) -> tuple[PairStore, SplitStats]:
  stats = SplitStats()
  kept = [ex.pair for ex in examples(rows, data.source, tokenizer, where, limit, stats)
          if ex.pair is not None]
  if stats.rows and not kept:
    raise DataSourceError(all_dropped(stats, where) + ' (python -m isdaa_jax.data --dump '
                          'previews what is kept)')
  return PairStore(kept), stats


def all_dropped(stats: SplitStats, where: str) -> str:
  """The sentence for a split whose every row was dropped, with the reasons by count."""
  return (f'all {stats.rows} rows of {where} were dropped: {_counts(stats.dropped)}; check '
          'config.data.source and the rows')


def _counts(counter: Mapping[str, int]) -> str:
  """'30 identical_responses, 10 empty_response': most frequent first."""
  return ', '.join(f'{n} {reason}' for reason, n in
                   sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])) if n)


def describe(summary: Mapping) -> list[str]:
  """The console lines of a `PairData.summary`: kept and dropped counts of each split."""
  eval_summary = summary.get('eval') or {}
  held_out = eval_summary.get('held_out_from_train', 0)
  lines = []
  for split, s in (('train', summary['train']), ('eval', eval_summary)):
    if 'rows' not in s:
      continue
    kept = s['kept'] + (held_out if split == 'train' else 0)
    line = f'data {split}: kept {kept} of {s["rows"]} rows'
    if split == 'train' and held_out:
      line += f' ({held_out} of them held out for eval)'
    if any(s['dropped'].values()):
      line += f'; dropped {_counts(s["dropped"])}'
    if any(s['truncated'].values()):
      line += f'; truncated {_counts(s["truncated"])}'
    lines.append(line)
  return lines


@dataclasses.dataclass
class PairData:
  """The tokenized splits of one config; `eval` is None when the config names no eval data."""
  train: PairStore
  eval: PairStore | None
  summary: dict


def _split_name(data: ml_collections.ConfigDict) -> str:
  return data.path or data.hub_id or data.source


def load(data: ml_collections.ConfigDict, *, model_path: str = '', vocab_size: int = 0,
         tokenizer=None) -> PairData:
  """Reads, parses and tokenizes the train (and eval) split of `config.data`.

  The tokenizer is `tokenizer` if given, else loaded from `data.tokenizer` or `model_path` when
  text pairs need one. `vocab_size` (the model's) is needed by the synthetic source, and when
  positive every token id is checked against it.
  """
  tok = PairTokenizer(data, data.tokenizer or model_path, tokenizer)
  if data.source == 'synthetic':
    train_rows = sources.synthetic_rows(data.synthetic, vocab_size, data.shuffle_seed)
  else:
    train_rows = sources.read_rows(data, data.train_split)
  eval_rows = _eval_rows(data)
  train, train_stats = _load_split(train_rows, data, tok,
                                   f'{_split_name(data)} ({data.train_split})', data.max_examples)
  summary = dict(source=data.source, train=train_stats.as_dict(), eval=None)
  evals = None
  if data.eval_holdout > 0:
    if data.eval_holdout >= len(train):
      raise DataSourceError(f'config.data.eval_holdout={data.eval_holdout} leaves no training pairs '
                            f'out of {len(train)}; lower it')
    perm = np.random.default_rng([data.shuffle_seed, 0xE7A1]).permutation(len(train))
    evals, train = train.subset(np.sort(perm[:data.eval_holdout])), train.subset(
        np.sort(perm[data.eval_holdout:]))
    summary['eval'] = dict(held_out_from_train=len(evals))
    summary['train']['kept'] = len(train)
  elif eval_rows is not None:
    evals, eval_stats = _load_split(
        eval_rows, data, tok, f'{data.eval_path or _split_name(data)} ({data.eval_split})',
        data.eval_max_examples)
    summary['eval'] = eval_stats.as_dict()
  if vocab_size > 0:
    top = max(train.max_token_id(), evals.max_token_id() if evals is not None else -1)
    if top >= vocab_size:
      raise DataSourceError(f'the data holds token id {top} but the model vocabulary has '
                            f'{vocab_size} entries; use the model\'s tokenizer '
                            '(config.data.tokenizer) or a matching model')
  return PairData(train, evals, summary)


def _eval_rows(data: ml_collections.ConfigDict) -> Sequence[Mapping] | None:
  if data.eval_holdout > 0 or data.source == 'synthetic':
    return None
  if data.eval_path:
    return sources.read_path(data.eval_path, data.hub_subset, data.eval_split)
  if not data.eval_split or (data.path and sources.holds_one_split(data.path)):
    return None  # a single data file (or saved Dataset) is the training split only
  return sources.read_rows(data, data.eval_split)


class _LocalBatch:
  """Global batch of pair indices -> this process's rows in `layout` (`isdaa_jax.layout`), shaped
  by the whole global batch so the processes' local batches assemble into one global array."""

  def __init__(self, pairs: PairStore, layout, start: int, stop: int, micro_batches: int,
               row_multiple: int):
    self._pairs, self._layout, self._start, self._stop = pairs, layout, start, stop
    self._micro_batches, self._row_multiple = micro_batches, row_multiple

  def __call__(self, indices_G: np.ndarray) -> dict[str, np.ndarray]:
    return self._layout.collate([self._pairs[int(i)] for i in indices_G], self._start,
                                self._stop, micro_batches=self._micro_batches,
                                row_multiple=self._row_multiple)


def _local_batch(pairs, layout, data, process_index, process_count, micro_batches,
                 row_multiple) -> _LocalBatch:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if data.batch_size % count:
    raise DataSourceError(f'config.data.batch_size={data.batch_size} must be divisible by the '
                          f'number of JAX processes ({count})')
  local = data.batch_size // count
  return _LocalBatch(pairs, layout, index * local, (index + 1) * local, micro_batches,
                     row_multiple or count)


def _iterator(ds: grain.MapDataset, data) -> grain.DatasetIterator:
  # One reader thread per process: collation is light, and big prefetch buffers of padded
  # batches would only cost memory.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                               prefetch_buffer_size=data.worker_buffer_size))
  if data.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=data.worker_buffer_size))
  return iter(it_ds)


def _check_size(pairs: PairStore, data, what: str):
  if len(pairs) < data.batch_size:
    raise DataSourceError(f'the {what} split has {len(pairs)} pairs, fewer than one batch '
                          f'(config.data.batch_size={data.batch_size}); lower the batch size or '
                          'add data')


def steps_per_epoch(pairs: PairStore, data: ml_collections.ConfigDict) -> int:
  return len(pairs) // data.batch_size


def train_dataset(pairs: PairStore, data: ml_collections.ConfigDict, layout, *,
                  process_index: int | None = None, process_count: int | None = None,
                  micro_batches: int = 1, row_multiple: int = 0) -> grain.MapDataset:
  """Shuffled (per epoch), repeated `num_epochs` times, batched, this process's rows collated.

  Packed batches (`data.packing`) pack each of `micro_batches` strided micro-batches on its own
  (the step's gradient accumulation) and round their rows up to `row_multiple` (the
  data-parallel devices; 0 = the process count).
  """
  _check_size(pairs, data, 'train')
  ds = grain.MapDataset.range(len(pairs)).shuffle(seed=data.shuffle_seed)
  ds = ds.repeat(data.num_epochs).batch(data.batch_size, drop_remainder=True)
  return ds.map(_local_batch(pairs, layout, data, process_index, process_count, micro_batches,
                             row_multiple))


def train_iterator(pairs: PairStore, data: ml_collections.ConfigDict, layout, *,
                   process_index: int | None = None, process_count: int | None = None,
                   micro_batches: int = 1, row_multiple: int = 0) -> grain.DatasetIterator:
  """Local train batches; `get_state()`/`set_state()` resume exactly where they left off."""
  return _iterator(train_dataset(pairs, data, layout, process_index=process_index,
                                 process_count=process_count, micro_batches=micro_batches,
                                 row_multiple=row_multiple), data)


def eval_iterator(pairs: PairStore, data: ml_collections.ConfigDict, layout, *,
                  process_index: int | None = None, process_count: int | None = None,
                  row_multiple: int = 0) -> grain.DatasetIterator:
  """One pass in file order, no shuffle; a fresh iterator per evaluation."""
  _check_size(pairs, data, 'eval')
  ds = grain.MapDataset.range(len(pairs)).batch(data.batch_size, drop_remainder=True)
  return _iterator(ds.map(_local_batch(pairs, layout, data, process_index, process_count, 1,
                                       row_multiple)), data)
