"""Reading preference rows and parsing them into pairs, the way the field parses each dataset.

Rows come from `config.data.path` (a .jsonl, .jsonl.gz, .json or .parquet file, a saved Hugging
Face dataset, or a folder of per-split data files) or from the hub (`config.data.hub_id`).
A parser turns one row into a `TextPair` (prompt as chat messages or as a raw string, response
texts) or an `IdPair` (token ids taken as they are), or returns the reason it drops the row.
Rows a parser cannot read at all (a missing column) raise `DataSourceError`: a wrong
`config.data.source` should fail loudly, not drop every row.

Sources:
  hh             Anthropic HH-RLHF: `chosen`/`rejected` whole dialogues. The prompt is everything
                 before the last "\\n\\nAssistant:" (as user/assistant messages), the response
                 what follows it (one separating space removed).
  tldr           summarize_from_feedback comparisons (`info`, `summaries`, `choice`) with the
                 prompt "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:" (TRL's format).
  ultrafeedback  binarized style: `chosen`/`rejected` message lists ending with the assistant
  pairs          turn, with the prompt as their shared prefix or in `prompt`; or `prompt`,
                 `chosen`, `rejected` strings. Both names use the same parser.
  synthetic      random token pairs for tiny runs (`synthetic_rows`).
Every source also accepts rows already in `prompt`/`chosen`/`rejected` form, and rows with token
ids (`prompt_ids`, `chosen_ids`, `rejected_ids`, as written by the lab and `isdaa_jax.score`).
Log-prob columns pass through under the names of `collate.LOGP_COLUMNS`; `chosen_logps` /
`rejected_logps` are read as behavior log-probs and TRL's `ref_*_logps` as reference ones.
"""

import dataclasses
import gzip
import json
import pathlib
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from isdaa_jax.data import collate
from isdaa_jax.errors import UserError

HUMAN, ASSISTANT = '\n\nHuman:', '\n\nAssistant:'
_TURN_RE = re.compile(r'(\n\nHuman:|\n\nAssistant:)')
ID_COLUMNS = ('prompt_ids', 'chosen_ids', 'rejected_ids')
# Accepted input names of each log-prob column (first the canonical one).
LOGP_ALIASES = {
    'behavior_chosen_logps': ('behavior_chosen_logps', 'chosen_logps'),
    'behavior_rejected_logps': ('behavior_rejected_logps', 'rejected_logps'),
    'reference_chosen_logps': ('reference_chosen_logps', 'ref_chosen_logps'),
    'reference_rejected_logps': ('reference_rejected_logps', 'ref_rejected_logps'),
}
# Token ids the synthetic source reserves (collate pads with 0).
SYNTHETIC_BOS, SYNTHETIC_EOS, SYNTHETIC_FIRST_TOKEN = 1, 2, 3


class DataSourceError(UserError):
  """Data that cannot be read as configured; the message says what to change."""


class MalformedRowError(DataSourceError):
  """A row without the columns its source needs (the caller adds which row and file)."""


@dataclasses.dataclass
class TextPair:
  """A parsed pair: `prompt` is a list of {'role', 'content'} messages or a raw string."""
  prompt: list[dict[str, str]] | str
  chosen: str
  rejected: str
  logps: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class IdPair:
  """A pair given as token ids; they are used as they are (responses should end with EOS)."""
  prompt_ids: list[int]
  chosen_ids: list[int]
  rejected_ids: list[int]
  logps: dict[str, float] = dataclasses.field(default_factory=dict)


Parsed = TextPair | IdPair | str  # a str is the reason the row was dropped


# ----------------------------------------------------------------------------------------------
# Parsers.

def _column(row: Mapping, name: str, source: str):
  if name not in row:
    raise MalformedRowError(
        f"it has no '{name}' column (columns: {', '.join(sorted(row))}), which source "
        f"'{source}' needs; set config.data.source to the dataset's format")
  return row[name]


def _logps(row: Mapping) -> dict[str, float]:
  out = {}
  for name, aliases in LOGP_ALIASES.items():
    for alias in aliases:
      if alias in row and row[alias] is not None:
        try:
          out[name] = float(row[alias])
        except (TypeError, ValueError):
          raise MalformedRowError(f"its '{alias}' holds {row[alias]!r}, not a number; write the "
                                  'summed log-prob as a number (or null for none)') from None
        break
  for kind in ('behavior', 'reference'):
    present = [f'{kind}_{side}_logps' in out for side in collate.SIDES]
    if any(present) and not all(present):
      raise MalformedRowError(f'it has {kind} log-probs for only one side of the pair; give both '
                              'chosen and rejected log-probs or neither')
  return out


# A summed log-prob is <= 0; float32 sums of near-certain tokens can round a little above it.
_LOGP_ROUNDING = 1e-3


def logps_problem(logps: Mapping[str, float]) -> str | None:
  """The drop reason of a pair whose log-probs no policy could have produced, else None.

  NaN, inf or a positive log-probability would otherwise reach the loss and the importance
  weight and look like a diverging run.
  """
  values = np.asarray(list(logps.values()), np.float64)
  if not np.isfinite(values).all():
    return 'nonfinite_logps'
  if (values > _LOGP_ROUNDING).any():
    return 'positive_logps'
  return None


def _strip_separator(text: str) -> str:
  """Removes the one space that follows a 'Human:'/'Assistant:' marker."""
  return text[1:] if text.startswith(' ') else text


def _check_responses(chosen: str, rejected: str) -> str | None:
  if not chosen.strip() or not rejected.strip():
    return 'empty_response'
  if chosen == rejected:
    return 'identical_responses'
  return None


def split_hh_dialogue(dialogue: str) -> tuple[str, str] | None:
  """(text before the last '\\n\\nAssistant:', the response after it), or None without one."""
  i = dialogue.rfind(ASSISTANT)
  if i < 0:
    return None
  return dialogue[:i], _strip_separator(dialogue[i + len(ASSISTANT):])


def hh_messages(prompt_text: str) -> list[dict[str, str]] | None:
  """The turns of an HH prompt as chat messages; None when it does not start with a turn."""
  parts = _TURN_RE.split(prompt_text)
  if parts[0] or len(parts) < 3:
    return None
  return [{'role': 'user' if marker == HUMAN else 'assistant', 'content': _strip_separator(text)}
          for marker, text in zip(parts[1::2], parts[2::2])]


def parse_ids(row: Mapping) -> Parsed:
  ids = []
  for name in ID_COLUMNS:
    seq = _column(row, name, 'token ids')
    try:
      raw = np.asarray(seq)
      with np.errstate(invalid='ignore'):  # NaN/inf are refused below, not cast
        arr = raw.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
      raise MalformedRowError(f"its '{name}' is not a list of integers") from None
    if raw.dtype.kind == 'f':
      # Integral floats (7.0, as pandas writes an int column with a gap) are the ids they name;
      # 7.5 is no token id, and the cast would silently truncate it to 7.
      fractional = raw[~(np.isfinite(raw) & (raw == np.round(raw)))]
      if fractional.size:
        raise MalformedRowError(f"its '{name}' holds {float(fractional.flat[0])!r}, not an "
                                'integer token id; write the token ids as integers')
    if arr.ndim != 1 or (arr.size and arr.min() < 0):
      raise MalformedRowError(f"its '{name}' is not a flat list of non-negative token ids")
    ids.append(arr.tolist())
  prompt, chosen, rejected = ids
  if not prompt:
    return 'empty_prompt'
  if not chosen or not rejected:
    return 'empty_response'
  if chosen == rejected:
    return 'identical_responses'
  return IdPair(prompt, chosen, rejected, _logps(row))


def _messages(value, name: str) -> list[dict[str, str]]:
  if not isinstance(value, (list, tuple)):
    raise MalformedRowError(f"its '{name}' is neither a string nor a list of messages")
  out = []
  for m in value:
    if not (isinstance(m, Mapping) and isinstance(m.get('role'), str)
            and isinstance(m.get('content'), str)):
      raise MalformedRowError(f"its '{name}' has an entry that is not a "
                              "{'role': str, 'content': str} message")
    out.append({'role': m['role'], 'content': m['content']})
  return out


def parse_pairs(row: Mapping, source: str = 'pairs') -> Parsed:
  """Generic `prompt`/`chosen`/`rejected` rows (strings or message lists) or token-id rows."""
  if all(name in row for name in ID_COLUMNS):
    return parse_ids(row)
  chosen, rejected = _column(row, 'chosen', source), _column(row, 'rejected', source)
  prompt = row['prompt'] if 'prompt' in row else None
  if isinstance(chosen, str) and isinstance(rejected, str):
    if prompt is None:
      raise MalformedRowError(f"its 'chosen'/'rejected' are strings but it has no 'prompt' "
                              'column; give the prompt separately or use message lists')
    prompt = prompt if isinstance(prompt, str) else _messages(prompt, 'prompt')
    reason = _check_responses(chosen, rejected)
    return reason or TextPair(prompt, chosen, rejected, _logps(row))
  chosen_m, rejected_m = _messages(chosen, 'chosen'), _messages(rejected, 'rejected')
  if not chosen_m or not rejected_m:
    return 'empty_response'
  if len(chosen_m) > 1 or len(rejected_m) > 1:
    # Implicit prompt (UltraFeedback binarized): the conversation before the final turn.
    if chosen_m[:-1] != rejected_m[:-1]:
      return 'prompt_mismatch'
    messages = chosen_m[:-1]
  elif prompt is None:
    raise MalformedRowError("its 'chosen'/'rejected' hold only the final turn and it has no "
                            "'prompt' column")
  else:
    messages = ([{'role': 'user', 'content': prompt}] if isinstance(prompt, str)
                else _messages(prompt, 'prompt'))
  if chosen_m[-1]['role'] != 'assistant' or rejected_m[-1]['role'] != 'assistant':
    return 'not_assistant_response'
  if not messages:
    return 'empty_prompt'
  c, r = chosen_m[-1]['content'], rejected_m[-1]['content']
  return _check_responses(c, r) or TextPair(messages, c, r, _logps(row))


def parse_hh(row: Mapping) -> Parsed:
  if 'prompt' in row or all(name in row for name in ID_COLUMNS):
    return parse_pairs(row, 'hh')
  chosen, rejected = _column(row, 'chosen', 'hh'), _column(row, 'rejected', 'hh')
  if not isinstance(chosen, str) or not isinstance(rejected, str):
    raise MalformedRowError("its 'chosen'/'rejected' are not dialogue strings")
  split_c, split_r = split_hh_dialogue(chosen), split_hh_dialogue(rejected)
  if split_c is None or split_r is None:
    return 'no_assistant_turn'
  if split_c[0] != split_r[0]:
    return 'prompt_mismatch'
  messages = hh_messages(split_c[0])
  if messages is None:
    return 'no_human_turn'
  return (_check_responses(split_c[1], split_r[1])
          or TextPair(messages, split_c[1], split_r[1], _logps(row)))


def tldr_prompt(info: Mapping) -> str:
  """TRL's TL;DR prompt: Reddit posts with subreddit/title/post, CNN/DM articles with title."""
  if info.get('post'):
    post = info['post'].replace('\n\n', '\n')
    return f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {post}\n\nTL;DR:"
  if info.get('article'):
    article = info['article'].replace('\n\n', '\n')
    return f"TITLE: {info['title']}\n\n{article}\n\nTL;DR:"
  raise MalformedRowError("its 'info' has neither a 'post' nor an 'article'")


def parse_tldr(row: Mapping) -> Parsed:
  if 'info' not in row:
    return parse_pairs(row, 'tldr')
  summaries, choice = _column(row, 'summaries', 'tldr'), _column(row, 'choice', 'tldr')
  if choice not in (0, 1) or len(summaries) != 2:
    raise MalformedRowError("its 'choice' is not 0 or 1 over two 'summaries'")
  # The summary follows "TL;DR:" after one space, as the policies that wrote them saw it.
  chosen, rejected = (' ' + summaries[k]['text'].strip() for k in (choice, 1 - choice))
  return (_check_responses(chosen, rejected)
          or TextPair(tldr_prompt(row['info']), chosen, rejected, _logps(row)))


PARSERS: dict[str, Callable[[Mapping], Parsed]] = {
    'hh': parse_hh,
    'tldr': parse_tldr,
    'ultrafeedback': lambda row: parse_pairs(row, 'ultrafeedback'),
    'pairs': parse_pairs,
    'synthetic': parse_ids,
}


# ----------------------------------------------------------------------------------------------
# Readers.

def synthetic_rows(synthetic: ml_collections.ConfigDict, vocab_size: int,
                   seed: int) -> list[dict[str, Any]]:
  """Random token pairs: BOS + prompt tokens, responses ending with EOS, sides always differ."""
  if vocab_size <= SYNTHETIC_FIRST_TOKEN + 1:
    raise DataSourceError(f'the synthetic source needs the model vocab_size (> '
                          f'{SYNTHETIC_FIRST_TOKEN + 1}), got {vocab_size}; pass the model config')
  rng = np.random.default_rng([seed, 0x5A17])
  p_lo, p_hi = synthetic.prompt_length
  r_lo, r_hi = synthetic.response_length

  def tokens(lo, hi):
    return rng.integers(SYNTHETIC_FIRST_TOKEN, vocab_size, rng.integers(lo, hi + 1)).tolist()

  rows = []
  for _ in range(synthetic.num_pairs):
    prompt, chosen = tokens(p_lo, p_hi), tokens(r_lo, r_hi)
    rejected = chosen
    while rejected == chosen:
      rejected = tokens(r_lo, r_hi)
    rows.append(dict(prompt_ids=[SYNTHETIC_BOS] + prompt, chosen_ids=chosen + [SYNTHETIC_EOS],
                     rejected_ids=rejected + [SYNTHETIC_EOS]))
  return rows


def _jsonl_row(raw: bytes, n: int, path: pathlib.Path) -> dict:
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataSourceError(f'line {n} of {path} holds bytes that are not UTF-8 (at byte {e.start} '
                          'of the line); re-save the file as UTF-8 or remove the row') from None
  try:
    row = json.loads(text)
  except json.JSONDecodeError:
    raise DataSourceError(f'line {n} of {path} is not valid JSON; fix or remove it') from None
  if not isinstance(row, dict):
    raise DataSourceError(f'line {n} of {path} is a JSON {type(row).__name__}, not an object; '
                          'write one {"column": value, ...} object per line')
  return row


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  gz = path.suffix == '.gz'
  rows, n = [], 0
  try:
    # Bytes, decoded line by line: a bad byte is reported with its line, not as a bare codec error.
    with (gzip.open if gz else open)(path, 'rb') as f:
      for n, raw in enumerate(f, 1):
        if raw.strip():
          rows.append(_jsonl_row(raw, n, path))
  except gzip.BadGzipFile:
    raise DataSourceError(f'{path} is named .gz but is not gzip-compressed; rename it without '
                          '.gz or compress it with gzip') from None
  except (EOFError, zlib.error) as e:
    what = 'ends before its gzip stream does' if isinstance(e, EOFError) else 'has corrupt data'
    raise DataSourceError(f'{path} {what} (after line {n}); the file is truncated or damaged, so '
                          'download or compress it again') from None
  return rows


def read_file(path: pathlib.Path) -> Sequence[Mapping]:
  """Rows of one .jsonl, .jsonl.gz, .json (a list of objects) or .parquet file."""
  name = path.name.lower()
  if name.endswith(('.jsonl', '.jsonl.gz')):
    return _read_jsonl(path)
  if name.endswith('.json'):
    try:
      rows = json.loads(path.read_bytes().decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
      return _read_jsonl(path)  # JSON Lines under a .json name, or a bad line to report
    if not isinstance(rows, list):
      raise DataSourceError(f'{path} holds a JSON {type(rows).__name__}, not a list of rows; '
                            'write one object per row (JSON list or JSON Lines)')
    return rows
  if name.endswith('.parquet'):
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200].rstrip('.')
      raise DataSourceError(f'{path} is not a readable Parquet file ({reason}); the file is '
                            'truncated or damaged, so download or write it again') from None
  raise DataSourceError(f'{path} is not a .jsonl, .jsonl.gz, .json or .parquet file; '
                        'convert it or point config.data.path at a saved Hugging Face dataset')


_DATA_SUFFIXES = ('.jsonl', '.jsonl.gz', '.json', '.parquet')


def _read_folder(folder: pathlib.Path, subset: str, split: str) -> Sequence[Mapping]:
  import datasets  # pylint: disable=g-import-not-at-top
  if (folder / 'dataset_dict.json').exists():
    dd = datasets.load_from_disk(str(folder))
    if split not in dd:
      raise DataSourceError(f"the saved dataset {folder} has no split '{split}' (it has "
                            f"{', '.join(dd)}); set config.data.train_split/eval_split")
    return dd[split]
  if holds_one_split(folder):
    return datasets.load_from_disk(str(folder))
  root = folder / subset if subset else folder
  # A hub snapshot or hand-made folder: files named after the split, e.g. harmless-base/train.jsonl.gz
  # or data/train-00000-of-00001.parquet.
  named = re.compile(re.escape(split) + r'[-.]')  # 'train' matches train-0000.parquet, not train_sft
  files = sorted(p for p in root.rglob(f'{split}*')
                 if named.match(p.name) and p.name.lower().endswith(_DATA_SUFFIXES))
  if not files:
    raise DataSourceError(f"found no '{split}' data files (.jsonl[.gz], .json, .parquet) under "
                          f'{root}; check config.data.path, hub_subset and the split names '
                          "(config.data.eval_split='' runs without eval data)")
  return [row for f in files for row in read_file(f)]


def holds_one_split(path) -> bool:
  """A data file or a saved single-split Dataset: all of it is one split, whatever its name."""
  p = pathlib.Path(path).expanduser()
  return p.is_file() or ((p / 'dataset_info.json').exists() and (p / 'state.json').exists())


def read_path(path: str, subset: str, split: str) -> Sequence[Mapping]:
  """Rows of a local file (the whole of it) or of `split` in a local folder."""
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise DataSourceError(f'the data path {path!r} does not exist; point config.data.path (or '
                          'eval_path) at a data file or folder')
  return _read_folder(p, subset, split) if p.is_dir() else read_file(p)


def read_rows(data: ml_collections.ConfigDict, split: str) -> Sequence[Mapping]:
  """Raw rows of `split` from `data.path` (a file is the whole split) or from `data.hub_id`."""
  if data.path:
    return read_path(data.path, data.hub_subset, split)
  if not data.hub_id:
    raise DataSourceError(f'config.data.source={data.source!r} needs config.data.path (a local '
                          'file or folder) or config.data.hub_id')
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    return datasets.load_dataset(data.hub_id, data.hub_config or None,
                                 data_dir=data.hub_subset or None, split=split)
  except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200].rstrip('.')
    raise DataSourceError(
        f"could not load split '{split}' of the Hugging Face dataset {data.hub_id!r} ({reason}); "
        'check the id, split and network, or download it and set config.data.path to the local '
        'file or folder') from None
