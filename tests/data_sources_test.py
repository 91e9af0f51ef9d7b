"""Reading and parsing preference rows: HH, TL;DR, UltraFeedback/pairs, token ids, files, hub."""

import collections
import gzip
import json
import pathlib

import datasets
import numpy as np
import pytest

from isdaa_jax import defaults
from isdaa_jax.data import sources

HH_FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'data' / 'hh_small.jsonl'


def _hh_rows():
  return [json.loads(line) for line in HH_FIXTURE.open(encoding='utf-8')]


def test_hh_multi_turn_prompt_and_final_responses():
  row = next(r for r in _hh_rows() if r['note'] == 'multi turn')
  pair = sources.parse_hh(row)
  assert pair.prompt == [
      {'role': 'user', 'content': 'Can you help me plan a picnic?'},
      {'role': 'assistant', 'content': 'Of course. How many people are coming?'},
      {'role': 'user', 'content': 'About six friends.'},
      {'role': 'assistant', 'content': 'Then pack sandwiches, fruit, water and a big blanket.'},
      {'role': 'user', 'content': 'What about dessert?'},
  ]
  assert pair.chosen == 'Cookies travel well and do not melt.'
  assert pair.rejected == 'Skip it.'
  assert pair.logps == {}


def test_hh_drop_reasons_on_the_fixture():
  reasons = collections.Counter()
  for row in _hh_rows():
    parsed = sources.parse_hh(row)
    reasons[parsed if isinstance(parsed, str) else 'kept'] += 1
  assert reasons == {'kept': 13, 'prompt_mismatch': 2, 'empty_response': 2,
                     'identical_responses': 1, 'no_assistant_turn': 1, 'no_human_turn': 1}
  by_note = {r['note']: sources.parse_hh(r) for r in _hh_rows()}
  assert by_note['prompts differ'] == 'prompt_mismatch'
  assert by_note['inline Human: without blank line'] == 'prompt_mismatch'
  assert by_note['single space rejected response'] == 'empty_response'
  assert by_note['unicode'].rejected == 'No lo sé — 不知道.'


def test_hh_split_is_exact():
  for row in _hh_rows():
    pair = sources.parse_hh(row)
    if isinstance(pair, str):
      continue
    for side, response in (('chosen', pair.chosen), ('rejected', pair.rejected)):
      cut = row[side].rfind('\n\nAssistant:')
      assert row[side][cut + len('\n\nAssistant:'):] == ' ' + response
      rebuilt = ''.join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                        for m in pair.prompt)
      assert rebuilt == row[side][:cut]


def test_tldr_reddit_and_article_prompts():
  row = dict(info=dict(id='t1', post='Line one.\n\nLine two.', title='My plant', subreddit='gardening',
                       article=None),
             summaries=[{'text': 'plant died'}, {'text': ' I overwatered it '}], choice=1)
  pair = sources.parse_tldr(row)
  assert pair.prompt == ('SUBREDDIT: r/gardening\n\nTITLE: My plant\n\nPOST: Line one.\nLine two.'
                         '\n\nTL;DR:')
  assert (pair.chosen, pair.rejected) == (' I overwatered it', ' plant died')
  row = dict(info=dict(post=None, title='Storm', article='A storm hit.\n\nPower is out.'),
             summaries=[{'text': 'storm'}, {'text': 'power out'}], choice=0)
  assert sources.parse_tldr(row).prompt == 'TITLE: Storm\n\nA storm hit.\nPower is out.\n\nTL;DR:'
  # TRL's flattened form goes through the generic parser.
  flat = sources.parse_tldr(dict(prompt='POST: x\n\nTL;DR:', chosen=' a', rejected=' b'))
  assert (flat.prompt, flat.chosen) == ('POST: x\n\nTL;DR:', ' a')
  with pytest.raises(sources.MalformedRowError, match='choice'):
    sources.parse_tldr(dict(info=dict(post='p', title='t', subreddit='s'),
                            summaries=[{'text': 'a'}, {'text': 'b'}], choice=2))


def test_ultrafeedback_message_lists():
  user = {'role': 'user', 'content': 'Name a prime number.'}
  row = dict(prompt='Name a prime number.', score_chosen=9.0, score_rejected=3.0,
             chosen=[user, {'role': 'assistant', 'content': 'Seven.'}],
             rejected=[user, {'role': 'assistant', 'content': 'Nine.'}])
  pair = sources.PARSERS['ultrafeedback'](row)
  assert pair.prompt == [user] and (pair.chosen, pair.rejected) == ('Seven.', 'Nine.')
  # Explicit prompt with one-message responses (TRL's conversational format).
  explicit = dict(prompt=[user], chosen=[{'role': 'assistant', 'content': 'Two.'}],
                  rejected=[{'role': 'assistant', 'content': 'Four.'}])
  assert sources.parse_pairs(explicit).prompt == [user]
  as_string = dict(explicit, prompt='Name a prime number.')
  assert sources.parse_pairs(as_string).prompt == [user]
  other = {'role': 'user', 'content': 'Name an even number.'}
  mismatch = dict(row, rejected=[other, {'role': 'assistant', 'content': 'Nine.'}])
  assert sources.parse_pairs(mismatch) == 'prompt_mismatch'
  not_assistant = dict(row, chosen=[user, {'role': 'user', 'content': 'Seven.'}])
  assert sources.parse_pairs(not_assistant) == 'not_assistant_response'
  empty = dict(row, chosen=[user, {'role': 'assistant', 'content': '  '}])
  assert sources.parse_pairs(empty) == 'empty_response'
  with pytest.raises(sources.MalformedRowError, match='message'):
    sources.parse_pairs(dict(row, chosen=[user, {'role': 'assistant', 'content': [{'x': 1}]}]))


def test_string_pairs_token_ids_and_log_prob_columns():
  pair = sources.parse_pairs(dict(prompt='Q:', chosen=' yes', rejected=' no', chosen_logps=-1.5,
                                  rejected_logps=-2.5, ref_chosen_logps=-1.0,
                                  ref_rejected_logps=-3.0))
  assert pair.prompt == 'Q:'
  assert pair.logps == {'behavior_chosen_logps': -1.5, 'behavior_rejected_logps': -2.5,
                        'reference_chosen_logps': -1.0, 'reference_rejected_logps': -3.0}
  ids = sources.parse_pairs(dict(prompt_ids=[1, 5], chosen_ids=[6, 2], rejected_ids=[7, 8, 2],
                                 reference_chosen_logps=-4.0, reference_rejected_logps=-5.0))
  assert isinstance(ids, sources.IdPair)
  assert (ids.prompt_ids, ids.chosen_ids, ids.rejected_ids) == ([1, 5], [6, 2], [7, 8, 2])
  assert ids.logps == {'reference_chosen_logps': -4.0, 'reference_rejected_logps': -5.0}
  # Every source takes token-id rows as they are.
  assert isinstance(sources.parse_hh(dict(prompt_ids=[1], chosen_ids=[3], rejected_ids=[4])),
                    sources.IdPair)
  assert sources.parse_ids(dict(prompt_ids=[1], chosen_ids=[3, 2], rejected_ids=[3, 2])) == (
      'identical_responses')
  assert sources.parse_ids(dict(prompt_ids=[], chosen_ids=[3], rejected_ids=[4])) == 'empty_prompt'
  with pytest.raises(sources.MalformedRowError, match='only one side'):
    sources.parse_pairs(dict(prompt='Q:', chosen=' a', rejected=' b', chosen_logps=-1.0))
  with pytest.raises(sources.MalformedRowError, match='non-negative'):
    sources.parse_ids(dict(prompt_ids=[1, -3], chosen_ids=[3], rejected_ids=[4]))


def test_missing_column_names_the_source():
  with pytest.raises(sources.MalformedRowError, match="no 'chosen' column.*source 'hh'"):
    sources.parse_hh(dict(question='?', answer='!'))


def test_synthetic_rows_are_deterministic_and_in_range():
  syn = defaults.data_config().synthetic
  a = sources.synthetic_rows(syn, vocab_size=64, seed=3)
  assert a == sources.synthetic_rows(syn, vocab_size=64, seed=3)
  assert a != sources.synthetic_rows(syn, vocab_size=64, seed=4)
  assert len(a) == syn.num_pairs
  for row in a:
    assert row['prompt_ids'][0] == sources.SYNTHETIC_BOS
    assert syn.prompt_length[0] + 1 <= len(row['prompt_ids']) <= syn.prompt_length[1] + 1
    for side in ('chosen_ids', 'rejected_ids'):
      assert row[side][-1] == sources.SYNTHETIC_EOS
      assert syn.response_length[0] + 1 <= len(row[side]) <= syn.response_length[1] + 1
      body = np.asarray(row[side][:-1] + row['prompt_ids'][1:])
      assert body.min() >= sources.SYNTHETIC_FIRST_TOKEN and body.max() < 64
    assert row['chosen_ids'] != row['rejected_ids']
  with pytest.raises(sources.DataSourceError, match='vocab_size'):
    sources.synthetic_rows(syn, vocab_size=0, seed=0)


def _write_rows(path: pathlib.Path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'wt', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')


def test_file_formats(tmp_path):
  rows = [dict(prompt=f'q{i}', chosen=f' a{i}', rejected=f' b{i}') for i in range(5)]
  _write_rows(tmp_path / 'r.jsonl', rows)
  _write_rows(tmp_path / 'r.jsonl.gz', rows)
  (tmp_path / 'r.json').write_text(json.dumps(rows))
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / 'r.parquet'))
  for name in ('r.jsonl', 'r.jsonl.gz', 'r.json', 'r.parquet'):
    assert list(map(dict, sources.read_file(tmp_path / name))) == rows, name
  (tmp_path / 'bad.jsonl').write_text('{"prompt": "x"}\n{not json\n')
  with pytest.raises(sources.DataSourceError, match='line 2 of .*bad.jsonl'):
    sources.read_file(tmp_path / 'bad.jsonl')
  (tmp_path / 'r.csv').write_text('a,b\n')
  with pytest.raises(sources.DataSourceError, match='not a .jsonl'):
    sources.read_file(tmp_path / 'r.csv')


def test_folders_saved_datasets_and_missing_paths(tmp_path):
  data = defaults.data_config()
  train = [dict(prompt='q', chosen=' a', rejected=' b')] * 3
  test = [dict(prompt='q', chosen=' c', rejected=' d')] * 2
  # A hub-snapshot-like folder with a subset sub-folder.
  _write_rows(tmp_path / 'snap' / 'harmless-base' / 'train.jsonl.gz', train)
  _write_rows(tmp_path / 'snap' / 'harmless-base' / 'test.jsonl.gz', test)
  # Another split whose name starts with 'train' must not be mixed in.
  _write_rows(tmp_path / 'snap' / 'harmless-base' / 'train_sft-00000-of-00001.jsonl', test)
  data.path, data.hub_subset = str(tmp_path / 'snap'), 'harmless-base'
  assert len(sources.read_rows(data, 'train')) == 3
  assert len(sources.read_rows(data, 'train_sft')) == 2
  assert len(sources.read_rows(data, 'test')) == 2
  with pytest.raises(sources.DataSourceError, match="no 'validation' data files"):
    sources.read_rows(data, 'validation')
  # A saved DatasetDict.
  datasets.DatasetDict(train=datasets.Dataset.from_list(train),
                       test=datasets.Dataset.from_list(test)).save_to_disk(str(tmp_path / 'dd'))
  data.path, data.hub_subset = str(tmp_path / 'dd'), ''
  assert [r['chosen'] for r in sources.read_rows(data, 'test')] == [' c', ' c']
  with pytest.raises(sources.DataSourceError, match="no split 'nope'"):
    sources.read_rows(data, 'nope')
  data.path = str(tmp_path / 'missing.jsonl')
  with pytest.raises(sources.DataSourceError, match='config.data.path'):
    sources.read_rows(data, 'train')


def test_unreachable_hub_is_one_sentence_naming_the_path_key():
  data = defaults.data_config()
  data.source, data.hub_id = 'hh', 'no-such-owner/no-such-dataset'
  with pytest.raises(sources.DataSourceError) as e:
    sources.read_rows(data, 'train')
  message = str(e.value)
  assert 'config.data.path' in message and 'no-such-owner/no-such-dataset' in message
  assert '\n' not in message and message.count('; ') <= 2


def _damaged_files(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  """Data files as users damage them -> (path, the start of the sentence they must get)."""
  rows = [dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[6, 2]) for _ in range(300)]
  good = ''.join(json.dumps(r) + '\n' for r in rows).encode()
  first = good[:good.index(b'\n') + 1]
  files = {}
  whole = gzip.compress(good)
  files['truncated_gz'] = ('t.jsonl.gz', whole[:len(whole) // 2],
                           r'.*t\.jsonl\.gz ends before its gzip stream does \(after line \d+\)')
  files['not_gzip'] = ('p.jsonl.gz', good, r'.*p\.jsonl\.gz is named \.gz but is not gzip')
  files['not_utf8'] = ('u.jsonl', first + b'{"prompt": "caf\xe9"}\n',
                       r'line 2 of .*u\.jsonl holds bytes that are not UTF-8 \(at byte 15 ')
  files['list_row'] = ('l.jsonl', first + b'[1, 2, 3]\n',
                       r'line 2 of .*l\.jsonl is a JSON list, not an object')
  files['bad_parquet'] = ('c.parquet', b'PAR1' + good[:100],
                          r'.*c\.parquet is not a readable Parquet file \(')
  out = {}
  for case, (name, content, sentence) in files.items():
    (folder / name).write_bytes(content)
    out[case] = (folder / name, sentence)
  return out


def test_damaged_files_are_one_sentence_naming_file_and_row(tmp_path):
  for case, (path, sentence) in _damaged_files(tmp_path).items():
    with pytest.raises(sources.DataSourceError, match=sentence) as e:
      sources.read_file(path)
    assert '\n' not in str(e.value) and '; ' in str(e.value), case
  # A .json list whose rows are not objects, and a log-prob that is no number, are refused with
  # their row by the parser's caller (the pipeline adds file and row).
  (tmp_path / 'x.json').write_bytes(b'{"prompt": "caf\xe9"}\n')
  with pytest.raises(sources.DataSourceError, match=r'line 1 of .*x\.json holds bytes'):
    sources.read_file(tmp_path / 'x.json')
  row = dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[6, 2])
  with pytest.raises(sources.MalformedRowError, match="its 'chosen_logps' holds 'abc', not a"):
    sources.parse_ids(dict(row, chosen_logps='abc', rejected_logps=-1.0))


def test_token_ids_must_be_integers():
  row = dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[6, 2])
  # Integral floats are the ids they name (pandas writes int columns with gaps as floats).
  assert sources.parse_ids(dict(row, chosen_ids=[5.0, 2.0])).chosen_ids == [5, 2]
  for bad, shown in ((7.5, '7.5'), (float('nan'), 'nan'), (float('inf'), 'inf')):
    with pytest.raises(sources.MalformedRowError,
                       match=f"its 'rejected_ids' holds {shown}, not an integer token id"):
      sources.parse_ids(dict(row, rejected_ids=[6, bad, 2]))


def test_impossible_log_probs_are_drop_reasons():
  ok = dict(behavior_chosen_logps=-3.0, behavior_rejected_logps=0.0)
  assert sources.logps_problem(ok) is None
  assert sources.logps_problem({}) is None
  assert sources.logps_problem(dict(ok, reference_chosen_logps=float('nan'))) == 'nonfinite_logps'
  assert sources.logps_problem(dict(ok, behavior_chosen_logps=float('inf'))) == 'nonfinite_logps'
  assert sources.logps_problem(dict(ok, behavior_rejected_logps=0.5)) == 'positive_logps'
  # float32 rounding of a near-certain response's sum stays a valid log-prob.
  assert sources.logps_problem(dict(ok, behavior_rejected_logps=1e-5)) is None
