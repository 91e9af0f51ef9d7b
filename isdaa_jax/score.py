"""Scores preference pairs under a policy and optionally a reference model.

  python -m isdaa_jax.score --model DIR_OR_HUB_ID [--reference DIR_OR_HUB_ID] --pairs FILE.jsonl \
      [--out OUT.jsonl] [--cache_out CACHE.npz] [--tokenizer DIR] [--batch_size N] \
      [--source pairs] [--as_reference] [--config=configs/hh.py] [--config.mesh.tensor=2 ...]

Input rows are token ids (`prompt_ids`, `chosen_ids`, `rejected_ids`; each side's sequence is
exactly prompt + response) or text rows in a `--source` format, formatted and tokenized by
`isdaa_jax.data` exactly as training does (`config.data`: chat format, max_length truncation).
Each kept row gives one output row with its input `index`, the token ids it was scored on,
`policy_chosen_logps`, `policy_rejected_logps` (log-probs summed over response tokens),
`chosen_tokens`, `rejected_tokens`, `reference_*_logps` when `--reference` is given, and the
implicit reward margin: (lp_w - rp_w) - (lp_l - rp_l) with a reference, lp_w - lp_l without.
`--as_reference` writes the model's log-probs as `reference_*_logps` instead: a file training
reads with `config.train.reference='precomputed'`.
`--cache_out` writes the reference log-probs (of `--model` with `--as_reference`, else of
`--reference`) as an `isdaa_jax.reference_cache` file instead of, or besides, `--out`: training
with `config.train.reference='cached'`, `config.train.reference_cache=CACHE.npz` and the same
data reads it when its key matches (same pairs after tokenization, tokenizer, `config.data`
truncation settings, reference weights and `config.model` dtypes), so pass the training
`--config` here; a mismatch is refused there, naming what differs.

Batches take the layout of the config's `data` section (`isdaa_jax.layout`: padded, prefix-shared
or packed), scored by `isdaa_jax.scoring.score_pairs`; every layout gives the same sums up to
float rounding.
"""

import dataclasses
import json
import pathlib
import sys
from typing import Mapping, Optional, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from isdaa_jax import atomic_file, cli, defaults, reference_cache, scoring, sharding
from isdaa_jax import layout as layout_lib
from isdaa_jax import policy as policy_lib
from isdaa_jax.data import collate, pipeline, sources
from isdaa_jax.data.tokenize import PairTokenizer
from isdaa_jax.errors import MissingFileError, UserError
from isdaa_jax.model import hf


def output_rows(examples: Sequence[pipeline.Example], policy: scoring.Scores,
                reference: Optional[scoring.Scores], as_reference: bool = False) -> list[dict]:
  """One JSON-ready row per scored pair (see the module docstring); behavior log-probs of the
  input pass through so the output is itself training data."""
  rows = []
  for k, ex in enumerate(examples):
    row = dict(index=ex.index)
    row.update({key: [int(t) for t in ex.pair[key]] for key in sources.ID_COLUMNS})
    row.update({c: ex.pair[c] for c in collate.LOGP_COLUMNS
                if c.startswith('behavior') and c in ex.pair})
    lp_w, lp_l = float(policy.chosen_logps[k]), float(policy.rejected_logps[k])
    role = 'reference' if as_reference else 'policy'
    row[f'{role}_chosen_logps'], row[f'{role}_rejected_logps'] = lp_w, lp_l
    row.update(chosen_tokens=int(policy.chosen_tokens[k]),
               rejected_tokens=int(policy.rejected_tokens[k]))
    if reference is not None:
      rp_w, rp_l = float(reference.chosen_logps[k]), float(reference.rejected_logps[k])
      row.update(reference_chosen_logps=rp_w, reference_rejected_logps=rp_l,
                 margin=(lp_w - rp_w) - (lp_l - rp_l))
    elif not as_reference:
      row['margin'] = lp_w - lp_l
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------------------------
# Command line.

def _define_flags():
  # Defined only when run as a program, so importing this module (training, tests) adds no
  # flags that could clash with another entry point's.
  config_flags.DEFINE_config_file(
      'config', defaults.__file__, 'Config file whose model (dtypes, attention), data '
      '(tokenization, length buckets, batch size) and mesh sections apply.', lock_config=True)
  flags.DEFINE_string('model', None, 'Policy: Hugging Face folder, .gguf file or hub id (with '
                      '--config.model.lora.init_from=ADAPTER, that PEFT adapter merged in).')
  flags.DEFINE_string('reference', None, 'Reference: Hugging Face folder or hub id.')
  flags.DEFINE_string('pairs', None, 'Pairs to score (.jsonl, .jsonl.gz, .json, .parquet).')
  flags.DEFINE_string('out', None, 'Output .jsonl file.')
  flags.DEFINE_string('cache_out', None, 'Reference log-prob cache (.npz) for training with '
                      "config.train.reference='cached'.")
  flags.DEFINE_string('tokenizer', None,
                      'Tokenizer for text rows (default: config.data.tokenizer, else --model).')
  flags.DEFINE_integer('batch_size', None, 'Pairs per batch (default: config.data.batch_size).')
  flags.DEFINE_enum('source', 'pairs', list(sources.PARSERS), 'Row format of --pairs.')
  flags.DEFINE_bool('as_reference', False, 'Write the --model log-probs as reference_*_logps '
                    '(precomputed reference log-probs for training).')
  flags.mark_flags_as_required(['model', 'pairs'])


def tokenized_examples(rows: Sequence[Mapping], source: str, data_config, tokenizer: str,
                       where: str) -> tuple[list[pipeline.Example], pipeline.SplitStats]:
  """Rows parsed and tokenized as training does; only the kept ones, in input order."""
  stats = pipeline.SplitStats()
  kept = [ex for ex in pipeline.examples(rows, source, PairTokenizer(data_config, tokenizer),
                                         where, 0, stats) if ex.pair is not None]
  return kept, stats


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
  if a.exists() and b.exists():
    return a.samefile(b)  # also through links
  return a.resolve() == b.resolve()


def _check_outputs(pairs: pathlib.Path, **outputs: Optional[str]):
  """Refuses an output that would overwrite the input pairs or the other output."""
  given = {f'--{flag}': pathlib.Path(p).expanduser() for flag, p in outputs.items() if p}
  for flag, out in given.items():
    if _same_file(out, pairs):
      raise UserError(f'{flag} {out} is the --pairs input; write the scores to another file '
                      '(the input is left untouched)')
  if len(given) == 2 and _same_file(*given.values()):
    raise UserError(f'--out and --cache_out are both {given["--out"]}; give them different files')


def run(config, *, model: str, reference: Optional[str], pairs_path: str,
        out_path: Optional[str], tokenizer: Optional[str], batch_size: Optional[int], source: str,
        as_reference: bool, cache_path: Optional[str] = None) -> dict:
  """The command: reads, scores and writes; returns the drop/truncation summary."""
  if as_reference and reference:
    raise UserError('--as_reference writes the --model log-probs as the reference; do not also '
                     'give --reference')
  if not (out_path or cache_path):
    raise UserError('give --out (scores as .jsonl) or --cache_out (a reference cache), or both')
  if cache_path and not (as_reference or reference):
    raise UserError('--cache_out stores reference log-probs: add --as_reference (the --model is '
                     'the reference) or --reference')
  path = pathlib.Path(pairs_path).expanduser()
  if not path.is_file():
    raise MissingFileError(f'--pairs {pairs_path} does not exist; give a .jsonl/.json/.parquet '
                            'file of pairs')
  _check_outputs(path, out=out_path, cache_out=cache_path)
  tokenizer = tokenizer or config.data.tokenizer or model
  examples, stats = tokenized_examples(sources.read_file(path), source, config.data, tokenizer,
                                       str(path))
  if not examples:
    raise UserError(f'no pair of {path} could be scored (dropped: {dict(stats.dropped)}); check '
                     '--source and the rows')
  pairs = [ex.pair for ex in examples]
  mesh = sharding.make_mesh(config.mesh)
  kwargs = dict(layout=layout_lib.from_config(config.data),
                batch_size=batch_size or config.data.batch_size,
                chunk_size=config.model.logprob_chunk_size)
  # One model in memory at a time: the reference loads after the policy is scored and freed.
  policy_model = policy_lib.load_model(config.model, model, mesh)
  policy = scoring.score_pairs(policy_model, pairs, mesh, desc='reference' if as_reference else 'policy',
                       **kwargs)
  del policy_model
  ref = None
  if reference:
    ref = scoring.score_pairs(hf.load_model(reference, config.model, mesh), pairs, mesh,
                      desc='reference', **kwargs)
  if cache_path and jax.process_index() == 0:
    reference_model = model if as_reference else reference
    key = reference_cache.fingerprint(pairs, tokenizer=tokenizer, data_config=config.data,
                                      reference=reference_model, model_config=config.model,
                                      seed=config.seed)
    reference_cache.save(pathlib.Path(cache_path).expanduser(), key,
                         dataclasses.asdict(policy if as_reference else ref))
  if out_path and jax.process_index() == 0:
    with atomic_file.replace(pathlib.Path(out_path).expanduser()) as f:
      for row in output_rows(examples, policy, ref, as_reference):
        f.write(json.dumps(row) + '\n')
  return stats.as_dict()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    summary = run(f.config, model=f.model, reference=f.reference, pairs_path=f.pairs,
                  out_path=f.out, tokenizer=f.tokenizer, batch_size=f.batch_size,
                  source=f.source, as_reference=f.as_reference, cache_path=f.cache_out)
  except UserError as e:
    logging.error('%s: %s', type(e).__name__, e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  written = ' and '.join(p for p in (f.out, f.cache_out) if p)
  print(f'scored {summary["kept"]} of {summary["rows"]} pairs -> {written}; dropped: '
        f'{summary["dropped"]}, truncated: {summary["truncated"]}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
