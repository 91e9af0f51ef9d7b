"""Preview what the model will see: parse and tokenize the training split and dump it.

  python -m isdaa_jax.data --config=configs/hh.py [--config.data.path=FILE] \\
      [--config.data.tokenizer=DIR_OR_HUB_ID] --dump=OUT.jsonl [--limit=N]

Writes OUT.jsonl, one row per kept pair, in source order: `prompt` (a list of {"role", "content"}
messages; a string for raw-text sources; null for token-id rows), `chosen` and `rejected` (the
response texts as parsed; null for token-id rows), `prompt_tokens`, `chosen_tokens`,
`rejected_tokens` (the token ids after formatting and truncation) and any log-prob columns; and
OUT.summary.json with `kept`, `dropped` (a count per reason), `rows` (source rows read),
`truncated` (kept pairs whose prompt / responses were cut), `source` and `split`.
`--limit=N` stops after N kept pairs (default: config.data.max_examples, 0 = all). Any eval
holdout is not applied: this is the training split as parsed.
"""

import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from isdaa_jax import atomic_file, config as config_lib
from isdaa_jax.data import collate, pipeline, sources, tokenize
from isdaa_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_DUMP = flags.DEFINE_string('dump', None, 'Output .jsonl of parsed, tokenized pairs.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Stop after this many kept pairs (0 = all).')


def _row(ex: pipeline.Example) -> dict:
  text = isinstance(ex.parsed, sources.TextPair)
  row = dict(prompt=ex.parsed.prompt if text else None,
             chosen=ex.parsed.chosen if text else None,
             rejected=ex.parsed.rejected if text else None)
  for name in ('prompt', 'chosen', 'rejected'):
    row[f'{name}_tokens'] = [int(t) for t in ex.pair[f'{name}_ids']]
  row.update({col: ex.pair[col] for col in collate.LOGP_COLUMNS if col in ex.pair})
  return row


def dump(config, out_path: str, limit: int) -> dict:
  """Writes the dump and its summary (each replaced whole, never half-written); returns the
  summary. When every row is dropped only the summary is written, and the error says why."""
  data = config.data
  out = pathlib.Path(out_path)
  if data.path and out.exists() and out.resolve() == pathlib.Path(data.path).resolve():
    raise UserError(f'--dump {out_path} is config.data.path; write the preview to another file '
                    '(the input is left untouched)')
  if data.source == 'synthetic':
    rows = sources.synthetic_rows(data.synthetic, config.model.vocab_size, data.shuffle_seed)
  else:
    rows = sources.read_rows(data, data.train_split)
  tok = tokenize.PairTokenizer(data, data.tokenizer or config.model.path)
  stats = pipeline.SplitStats()
  where = f'{data.path or data.hub_id or data.source} ({data.train_split})'
  summary_path = out.with_name(out.name.removesuffix('.jsonl') + '.summary.json')
  # Streamed into a temporary file that replaces OUT only once every row is written; raising
  # inside the block leaves an earlier OUT as it was.
  with atomic_file.replace(out) as f:
    for ex in pipeline.examples(rows, data.source, tok, where, limit, stats):
      if ex.pair is not None:
        f.write(json.dumps(_row(ex), ensure_ascii=False) + '\n')
    summary = dict(kept=stats.kept, dropped=dict(sorted(stats.dropped.items())),
                   rows=stats.rows, truncated=dict(sorted(stats.truncated.items())),
                   source=data.source, split=data.train_split)
    atomic_file.write_text(summary_path, json.dumps(summary, indent=2) + '\n')
    if stats.rows and not stats.kept:
      raise UserError(f'{pipeline.all_dropped(stats, where)}; nothing written to {out_path} '
                      f'(the counts are in {summary_path})')
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _DUMP.value:
    raise app.UsageError('give --config=CONFIG_FILE and --dump=OUT.jsonl')
  config = _CONFIG.value
  limit = config.data.max_examples if _LIMIT.value is None else _LIMIT.value
  try:
    config_lib.validate_data(config.data)
    summary = dump(config, _DUMP.value, limit)
  except UserError as e:
    sys.exit(f'error: {e}')
  print(f"kept {summary['kept']} of {summary['rows']} rows; dropped {summary['dropped']}; "
        f"wrote {_DUMP.value}")


if __name__ == '__main__':
  app.run(main)
