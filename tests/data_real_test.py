"""Real-data check: the hh pipeline over the whole HH-RLHF harmless-base test split with a real
32k Llama-style tokenizer (both from ../shared/data beside the repository, as CI provides them)."""

import collections
import gzip
import json
import pathlib

import pytest
import transformers

from configs import hh
from isdaa_jax.data import collate, pipeline, sources, tokenize
from isdaa_jax import layout as layout_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'
HH_FILE = SHARED / 'hh-rlhf' / 'harmless-base-test.jsonl.gz'
TOKENIZER = SHARED / 'tokenizer-llama2style'
ASSISTANT = '\n\nAssistant:'

pytestmark = pytest.mark.skipif(
    not (HH_FILE.exists() and (TOKENIZER / 'tokenizer.json').exists()),
    reason=f'the real HH-RLHF split and tokenizer are not at {SHARED} (CI provides ../shared)')


def _expected_reason(row) -> str | None:
  """The field's split at the last '\\n\\nAssistant:', written independently of the library."""
  (pc, rc), (pr, rr) = [(row[s][:row[s].rfind(ASSISTANT)], row[s][row[s].rfind(ASSISTANT):])
                        for s in ('chosen', 'rejected')]
  if pc != pr:
    return 'prompt_mismatch'
  if not rc[len(ASSISTANT):].strip() or not rr[len(ASSISTANT):].strip():
    return 'empty_response'
  if rc == rr:
    return 'identical_responses'
  return None


def test_whole_harmless_base_test_split():
  rows = [json.loads(line) for line in gzip.open(HH_FILE, 'rt', encoding='utf-8')]
  assert len(rows) == 2312
  config = hh.get_config()
  data = config.data
  data.path, data.tokenizer = str(HH_FILE), str(TOKENIZER)
  tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
  assert tok.chat_template is None  # so the plain format is what the model sees
  stats = pipeline.SplitStats()
  examples = list(pipeline.examples(rows, 'hh', tokenize.PairTokenizer(data, '', tok),
                                    str(HH_FILE), 0, stats))

  expected = {i: _expected_reason(r) for i, r in enumerate(rows)}
  assert {ex.index: ex.reason for ex in examples} == expected
  assert stats.kept + sum(stats.dropped.values()) == stats.rows == 2312
  assert stats.dropped == collections.Counter(r for r in expected.values() if r)
  assert set(stats.dropped) <= {'prompt_mismatch', 'empty_response', 'identical_responses'}
  assert stats.dropped['prompt_mismatch'] >= 1 and stats.dropped['empty_response'] >= 1

  kept = [ex for ex in examples if ex.pair is not None]
  dialogues, token_streams = [], []
  for ex in kept:
    row, pair, ids = rows[ex.index], ex.parsed, ex.pair
    for side, response in (('chosen', pair.chosen), ('rejected', pair.rejected)):
      cut = row[side].rfind(ASSISTANT)
      assert ' ' + response == row[side][cut + len(ASSISTANT):]
      assert tokenize.plain_prompt(pair.prompt) == row[side][:cut + len(ASSISTANT)]
    # Turns start and end with the human; a few dialogues hold two assistant turns in a row (an
    # inline "Human:" without the blank line), which the field keeps as they are.
    assert pair.prompt[0]['role'] == pair.prompt[-1]['role'] == 'user'
    assert ids['prompt_ids'][0] == tok.bos_token_id and ids['prompt_ids'].count(1) == 1
    assert len(ids['prompt_ids']) <= data.max_prompt_length or (
        len(ids['prompt_ids']) + max(len(ids['chosen_ids']), len(ids['rejected_ids'])) <= 512)
    for side in ('chosen', 'rejected'):
      resp = ids[f'{side}_ids']
      assert len(ids['prompt_ids']) + len(resp) <= data.max_length
      # Untouched pairs: BOS + the tokens of the whole released dialogue + EOS.
      if len(ids['prompt_ids']) < data.max_prompt_length and resp[-1] == tok.eos_token_id:
        dialogues.append(row[side])
        token_streams.append(ids['prompt_ids'][1:] + resp[:-1])
  assert len(dialogues) > 0.8 * 2 * len(kept)
  assert tok(dialogues, add_special_tokens=False)['input_ids'] == token_streams

  store = pipeline.PairStore([ex.pair for ex in kept])
  batch = next(pipeline.train_iterator(store, data, layout_lib.from_config(data), process_index=0, process_count=1))
  assert batch['chosen_input_ids'].shape[0] == data.batch_size
  assert batch['chosen_input_ids'].shape[1] in data.length_buckets
  assert batch['chosen_input_ids'].max() < len(tok)
  assert sources.HUMAN not in ''.join(m['content'] for m in kept[0].parsed.prompt)
  assert set(batch) >= {f'{s}_loss_mask' for s in collate.SIDES}
