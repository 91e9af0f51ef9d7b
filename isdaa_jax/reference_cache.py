"""Reference log-probs computed once and kept in a file keyed by everything that determines them.

With `config.train.reference='cached'` training holds no reference model: a pre-pass (or
`python -m isdaa_jax.score --as_reference --cache_out FILE`) scores every pair of a split under
the reference once and stores the sums here; later runs and resumptions read them back as the
`reference_*_logps` columns (6N instead of 8N FLOPs per token, no reference parameters on device).

The key is a sha256 over five components, each itself a sha256:
  pairs      every tokenized pair's token ids, in order (and how many pairs there are)
  tokenizer  the tokenizer's files (vocabulary, merges, chat template); none without a tokenizer
  data       the config.data settings that change tokens: chat_format, max_length,
             max_prompt_length
  reference  the reference checkpoint's config.json and *.safetensors contents, or the
             architecture and seed of a randomly initialised one
  numerics   config.model dtype and param_dtype (bfloat16 log-probs differ from float32 ones)
A file whose key is not the expected one is refused with the components that differ; nothing is
recomputed or overwritten behind the user's back.

File: one .npz of float32 [N] arrays `chosen_logps`, `rejected_logps`, `chosen_tokens`,
`rejected_tokens` and a JSON string `metadata` (key, components, N, a checksum of the arrays,
version, creation time), written to a temporary file and renamed so no half file ever loads.
"""

import dataclasses
import fnmatch
import hashlib
import json
import pathlib
import time
import zipfile
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import isdaa_jax
from isdaa_jax import atomic_file
from isdaa_jax.errors import UserError

FORMAT = 'isdaa_jax.reference_cache/1'
ARRAYS = ('chosen_logps', 'rejected_logps', 'chosen_tokens', 'rejected_tokens')
_BLOCK_BYTES = 1 << 20
_ID_KEYS = ('prompt_ids', 'chosen_ids', 'rejected_ids')
_TOKENIZER_FILES = ('tokenizer*', 'special_tokens_map.json', 'vocab.json', 'merges.txt',
                    'added_tokens.json', 'chat_template*', '*.tiktoken')
_DATA_KEYS = ('chat_format', 'max_length', 'max_prompt_length')
_NUMERIC_KEYS = ('dtype', 'param_dtype')
# What each component covers, for the refusal message.
_WHAT = dict(pairs='tokenized pairs (data, max_examples, eval_holdout, ...)',
             tokenizer='tokenizer files',
             data='config.data chat_format/max_length/max_prompt_length',
             reference='reference weights (train.reference_path, model.path or seed)',
             numerics='config.model dtype/param_dtype')


class ReferenceCacheError(UserError):
  """A file at a cache path that is not a complete reference cache."""


class StaleReferenceCacheError(ReferenceCacheError):
  """A readable cache made for other pairs, tokenizer, settings or reference weights."""


@dataclasses.dataclass(frozen=True)
class Key:
  digest: str  # hex sha256 over the components
  components: dict  # component name -> hex sha256
  num_pairs: int


def _sha_json(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _sha_files(paths: Sequence[pathlib.Path]) -> str:
  """Names and contents (not mtimes), streamed so a large checkpoint is never held in memory."""
  h = hashlib.sha256()
  for path in paths:
    h.update(f'{path.name}\0{path.stat().st_size}\0'.encode())
    with open(path, 'rb') as f:
      while block := f.read(_BLOCK_BYTES):
        h.update(block)
  return h.hexdigest()


def pairs_digest(pairs: Sequence[Mapping]) -> str:
  """Token ids of every pair in order; lengths are hashed too so boundaries cannot shift."""
  h = hashlib.sha256(f'{len(pairs)} pairs'.encode())
  for i in range(len(pairs)):
    pair = pairs[i]
    for key in _ID_KEYS:
      ids = np.asarray(pair[key], '<i4')
      h.update(np.int64(ids.size).tobytes())
      h.update(ids.tobytes())
  return h.hexdigest()


def tokenizer_digest(name: str) -> str:
  """The tokenizer files of a folder or hub id ('' = no tokenizer: token-id data)."""
  from isdaa_jax import gguf_file  # pylint: disable=g-import-not-at-top
  from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
  if not name:
    return _sha_json('no tokenizer')
  model_file = gguf_file.find(name)
  if model_file is not None:  # the tokenizer is metadata of the model file
    return _sha_files([model_file])
  folder = hf.resolve(name, _TOKENIZER_FILES)
  files = sorted(p for p in folder.iterdir() if p.is_file() and any(
      fnmatch.fnmatch(p.name, pattern) for pattern in _TOKENIZER_FILES))
  return _sha_files(files)


def reference_digest(path: str, model_config, seed: int) -> str:
  """A checkpoint folder (or hub id, resolved as the model loader does) by content; '' = the
  random initialisation of `model_config`'s architecture with `seed`."""
  from isdaa_jax import gguf_file  # pylint: disable=g-import-not-at-top
  from isdaa_jax.model import hf, llama  # pylint: disable=g-import-not-at-top
  model_file = gguf_file.find(path) if path else None
  if model_file is not None:
    return _sha_files([model_file])
  if path:
    folder = hf.resolve(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name == 'config.json' or p.name.endswith(('.safetensors', '.safetensors.index.json'))))
    return _sha_files(files)
  policy = llama.execution_policy(model_config)
  arch = {k: v for k, v in dataclasses.asdict(llama.LlamaConfig.from_model_config(
      model_config)).items() if k not in policy}
  return _sha_json(dict(random_init=arch, seed=seed))


def shared_components(*, tokenizer: str, data_config, reference: str, model_config,
                      seed: int) -> dict:
  """The key components every split shares (all but `pairs`); `tokenizer` and `reference` are
  folders or hub ids ('' = token-id data / random initialisation with `seed`). Hashing the
  reference reads the whole checkpoint, so compute this once for all splits."""
  return dict(
      tokenizer=tokenizer_digest(tokenizer),
      data=_sha_json({k: data_config[k] for k in _DATA_KEYS}),
      reference=reference_digest(reference, model_config, seed),
      numerics=_sha_json({k: model_config[k] for k in _NUMERIC_KEYS}))


def key_for(pairs: Sequence[Mapping], shared: Mapping[str, str]) -> Key:
  """The key of `pairs`' reference log-probs given `shared_components(...)`."""
  components = dict(pairs=pairs_digest(pairs), **shared)
  return Key(_sha_json(components), components, len(pairs))


def fingerprint(pairs: Sequence[Mapping], *, tokenizer: str, data_config, reference: str,
                model_config, seed: int) -> Key:
  """The key of `pairs`' reference log-probs (arguments as `shared_components`)."""
  return key_for(pairs, shared_components(tokenizer=tokenizer, data_config=data_config,
                                          reference=reference, model_config=model_config,
                                          seed=seed))


def cache_path(setting: str, workdir, key: Key, split: str) -> pathlib.Path:
  """`config.train.reference_cache` names the train split's file (other splits: FILE-split.npz
  beside it); '' keys the file automatically under WORKDIR/reference_logps."""
  if not setting:
    return pathlib.Path(workdir) / 'reference_logps' / f'{key.digest[:16]}-{split}.npz'
  path = pathlib.Path(setting).expanduser()
  return path if split == 'train' else path.with_name(f'{path.stem}-{split}{path.suffix}')


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in ARRAYS:
    h.update(name.encode() + np.ascontiguousarray(arrays[name], '<f4').tobytes())
  return h.hexdigest()


def save(path, key: Key, arrays: Mapping[str, np.ndarray]):
  """Writes the cache atomically: a run killed mid-write leaves only a stray temporary file."""
  arrays = {name: np.asarray(arrays[name], np.float32) for name in ARRAYS}
  if any(a.shape != (key.num_pairs,) for a in arrays.values()):
    raise ValueError(f'reference cache arrays must be [{key.num_pairs}], got '
                     f'{ {k: a.shape for k, a in arrays.items()} }')
  metadata = dict(format=FORMAT, key=key.digest, components=key.components,
                  num_pairs=key.num_pairs, arrays_sha256=_arrays_digest(arrays),
                  isdaa_jax_version=isdaa_jax.__version__,
                  created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  with atomic_file.replace(path, 'wb') as f:
    np.savez(f, metadata=np.asarray(json.dumps(metadata)), **arrays)


def load(path, expected: Key) -> dict[str, np.ndarray]:
  """The cached float32 [N] arrays; raises StaleReferenceCacheError naming the differing
  components when the file's key is not `expected`, ReferenceCacheError when it is no cache."""
  try:
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f['metadata'][()]))
      arrays = {name: f[name] for name in ARRAYS}
    complete = (meta['format'] == FORMAT and all(
        a.dtype == np.float32 and a.shape == (meta['num_pairs'],) for a in arrays.values())
                and meta['arrays_sha256'] == _arrays_digest(arrays))
  except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
          zipfile.BadZipFile):
    complete = False
  if not complete:
    raise ReferenceCacheError(f'{path} is not a complete reference cache (truncated, corrupted '
                              'or another kind of file); delete it to recompute it, or point '
                              'config.train.reference_cache elsewhere')
  if meta['key'] != expected.digest:
    stored = meta['components'] if isinstance(meta['components'], dict) else {}
    changed = [_WHAT[c] for c, v in expected.components.items() if stored.get(c) != v]
    raise StaleReferenceCacheError(
        f'{path} is stale: it was made for other {"; ".join(changed) or "settings"} (its key '
        f'{meta["key"][:16]}, this run {expected.digest[:16]}); delete it to recompute it, point '
        'config.train.reference_cache elsewhere, or rebuild it with python -m isdaa_jax.score '
        '--as_reference --cache_out')
  if meta['num_pairs'] != expected.num_pairs:
    raise ReferenceCacheError(f'{path} holds {meta["num_pairs"]} pairs but its key is that of '
                              f'{expected.num_pairs}; delete it to recompute it')
  return arrays


_MISSING, _FOUND, _REFUSED = 0, 1, 2


def load_or_compute(path, key: Key,
                    compute: Callable[[], Mapping[str, np.ndarray]]) -> tuple[dict, bool]:
  """(arrays, computed): the cache at `path`, else `compute()` (run by every process) saved there
  by process 0.

  Process 0 alone reads the file and broadcasts what it found, so every process takes the same
  branch (`compute` is collective), also when the file is on process 0's disk only.
  """
  path = pathlib.Path(path)
  status, arrays, error = _MISSING, None, None
  if jax.process_index() == 0 and path.exists():
    try:
      arrays, status = load(path, key), _FOUND
    except ReferenceCacheError as e:
      status, error = _REFUSED, e
  status = int(multihost_utils.broadcast_one_to_all(np.int32(status)))
  if status == _REFUSED:
    raise error or ReferenceCacheError(f'process 0 refused the reference cache {path}; see its '
                                       'error message')
  if status == _FOUND:
    arrays = arrays or {name: np.zeros(key.num_pairs, np.float32) for name in ARRAYS}
    logging.info('reference log-probs of %d pairs read from %s', key.num_pairs, path)
    return dict(multihost_utils.broadcast_one_to_all(arrays)), False
  arrays = {name: np.asarray(a, np.float32) for name, a in compute().items()}
  if jax.process_index() == 0:
    save(path, key, arrays)
    logging.info('reference log-probs of %d pairs saved to %s', key.num_pairs, path)
  return arrays, True
