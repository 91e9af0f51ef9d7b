"""The Grain pipeline: buckets, determinism, resumable state, per-process shards, eval, summary."""

import json
import pathlib

import datasets
import numpy as np
import pytest

import tokenizer_util
from isdaa_jax import defaults
from isdaa_jax.data import collate, pipeline, sources
from isdaa_jax import layout as layout_lib

N_PAIRS, BUCKETS = 100, (16, 32, 64)
HH_FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'data' / 'hh_small.jsonl'


def _id_rows(n=N_PAIRS, logps=False, seed=0):
  """Token-id pairs whose 2nd and 3rd prompt tokens spell the row index; varied lengths."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    filler = rng.integers(3, 500, rng.integers(0, 20)).tolist()
    row = dict(prompt_ids=[1, 3 + i // 100, 3 + i % 100] + filler,
               chosen_ids=rng.integers(3, 500, rng.integers(1, 30)).tolist() + [2],
               rejected_ids=rng.integers(3, 500, rng.integers(1, 30)).tolist() + [2])
    if logps:
      row.update(chosen_logps=-float(i), rejected_logps=-float(i) - 0.5,
                 ref_chosen_logps=-float(i) - 0.25, ref_rejected_logps=-float(i) - 0.75)
    rows.append(row)
  return rows


def _ident(batch):
  ids = batch['chosen_input_ids']
  return ((ids[:, 1] - 3) * 100 + ids[:, 2] - 3).tolist()


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _data(path, **overrides):
  data = defaults.data_config()
  data.source, data.path = 'pairs', str(path)
  data.max_length, data.max_prompt_length, data.length_buckets = 64, 32, BUCKETS
  data.batch_size = 8
  for key, value in overrides.items():
    data[key] = value
  return data


@pytest.fixture
def id_file(tmp_path):
  return _write(tmp_path / 'pairs.jsonl', _id_rows())


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_are_padded_to_the_smallest_fitting_bucket(id_file):
  data = _data(id_file)
  pairs = pipeline.load(data).train
  assert len(pairs) == N_PAIRS and pipeline.steps_per_epoch(pairs, data) == 12
  batches = list(pipeline.train_iterator(pairs, data, layout_lib.from_config(data)))
  assert len(batches) == 12  # the last incomplete batch is dropped
  seen = []
  for batch in batches:
    assert set(batch) == {f'{s}_{k}' for s in collate.SIDES for k in (
        'input_ids', 'targets', 'loss_mask', 'positions', 'segment_ids')}
    idx = _ident(batch)
    seen += idx
    longest = int(pairs.lengths[idx].max())
    t = batch['chosen_input_ids'].shape[1]
    assert t == collate.bucket_for(longest, BUCKETS)
    for value in batch.values():
      assert value.shape == (8, t) and value.dtype == np.int32
    # Every row is exactly its pair.
    for row, i in enumerate(idx):
      p = pairs[i]
      n = len(p['prompt_ids']) + len(p['chosen_ids'])
      np.testing.assert_array_equal(batch['chosen_input_ids'][row, :n],
                                    np.concatenate([p['prompt_ids'], p['chosen_ids']]))
  assert len(set(seen)) == 96 and set(seen) <= set(range(N_PAIRS))


def test_shuffle_is_deterministic_per_seed_and_epoch(id_file):
  data = _data(id_file, num_epochs=2)
  pairs = pipeline.load(data).train
  order = [i for b in pipeline.train_iterator(pairs, data, layout_lib.from_config(data)) for i in _ident(b)]
  assert len(order) == 200
  assert sorted(order[:100]) == sorted(order[100:]) == list(range(100))
  assert order[:100] != order[100:]  # reshuffled each epoch
  assert order[:100] != list(range(100))
  again = [i for b in pipeline.train_iterator(pairs, data, layout_lib.from_config(data)) for i in _ident(b)]
  assert again == order
  other = _data(id_file, num_epochs=2, shuffle_seed=7)
  assert [i for b in pipeline.train_iterator(pairs, other, layout_lib.from_config(other)) for i in _ident(b)] != order


def test_state_round_trip_gives_the_same_next_batches(id_file):
  data = _data(id_file, num_epochs=3)
  pairs = pipeline.load(data).train
  it = pipeline.train_iterator(pairs, data, layout_lib.from_config(data))
  _take(it, 10)  # crosses into the second epoch
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 5)
  resumed = pipeline.train_iterator(pairs, data, layout_lib.from_config(data))
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_worker_processes_give_the_same_batches_and_state(id_file):
  data = _data(id_file)
  pairs = pipeline.load(data).train
  reference = list(pipeline.train_iterator(pairs, data, layout_lib.from_config(data)))
  mp_data = _data(id_file, worker_count=1)
  it = pipeline.train_iterator(pairs, mp_data, layout_lib.from_config(mp_data))
  first = _take(it, 4)
  state = it.get_state()
  _assert_same_batches(first + list(it), reference)
  resumed = pipeline.train_iterator(pairs, mp_data, layout_lib.from_config(mp_data))
  resumed.set_state(state)
  _assert_same_batches(list(resumed), reference[4:])


def test_processes_get_disjoint_halves_of_each_global_batch(id_file):
  data = _data(id_file)
  pairs = pipeline.load(data).train
  whole = list(pipeline.train_iterator(pairs, data, layout_lib.from_config(data), process_index=0, process_count=1))
  halves = [list(pipeline.train_iterator(pairs, data, layout_lib.from_config(data), process_index=p, process_count=2))
            for p in (0, 1)]
  covered = []
  for g, h0, h1 in zip(whole, *halves):
    assert h0['chosen_input_ids'].shape == h1['chosen_input_ids'].shape == (
        4, g['chosen_input_ids'].shape[1])  # one bucket for the whole global batch
    assert not set(_ident(h0)) & set(_ident(h1))
    for key in g:
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), g[key])
    covered += _ident(h0) + _ident(h1)
  assert len(covered) == len(set(covered)) == 96
  with pytest.raises(sources.DataSourceError, match='divisible'):
    pipeline.train_iterator(pairs, _data(id_file, batch_size=6), layout_lib.from_config(_data(id_file, batch_size=6)), process_index=0, process_count=4)


def test_eval_iterator_is_ordered_and_restartable(id_file):
  data = _data(id_file, eval_holdout=0)
  pairs = pipeline.load(data).train
  first = list(pipeline.eval_iterator(pairs, data, layout_lib.from_config(data)))
  assert [i for b in first for i in _ident(b)] == list(range(96))
  _assert_same_batches(list(pipeline.eval_iterator(pairs, data, layout_lib.from_config(data))), first)
  halves = [list(pipeline.eval_iterator(pairs, data, layout_lib.from_config(data), process_index=p, process_count=2))
            for p in (0, 1)]
  assert [i for b0, b1 in zip(*halves) for i in _ident(b0) + _ident(b1)] == list(range(96))


def test_log_prob_columns_pass_through(tmp_path):
  path = _write(tmp_path / 'scored.jsonl', _id_rows(logps=True))
  data = _data(path)
  batch = next(pipeline.train_iterator(pipeline.load(data).train, data, layout_lib.from_config(data)))
  idx = np.asarray(_ident(batch), np.float32)
  np.testing.assert_array_equal(batch['behavior_chosen_logps'], -idx)
  np.testing.assert_array_equal(batch['behavior_rejected_logps'], -idx - 0.5)
  np.testing.assert_array_equal(batch['reference_chosen_logps'], -idx - 0.25)
  np.testing.assert_array_equal(batch['reference_rejected_logps'], -idx - 0.75)
  assert batch['reference_chosen_logps'].dtype == np.float32
  rows = _id_rows(logps=True)
  for r in rows[:3]:
    del r['ref_chosen_logps'], r['ref_rejected_logps']
  with pytest.raises(sources.DataSourceError, match='for every row or for none'):
    pipeline.load(_data(_write(tmp_path / 'partial.jsonl', rows)))


def test_eval_sources(tmp_path, id_file):
  held = pipeline.load(_data(id_file, eval_holdout=20))
  assert (len(held.train), len(held.eval)) == (80, 20)
  train_ids = {tuple(held.train[i]['prompt_ids'][1:3]) for i in range(80)}
  eval_ids = {tuple(held.eval[i]['prompt_ids'][1:3]) for i in range(20)}
  assert not train_ids & eval_ids and len(train_ids | eval_ids) == 100
  assert held.summary['eval'] == {'held_out_from_train': 20} and held.summary['train']['kept'] == 80
  assert pipeline.load(_data(id_file)).eval is None  # a single file is the training split only
  other = _write(tmp_path / 'other.jsonl', _id_rows(n=16, seed=1))
  with_path = pipeline.load(_data(id_file, eval_path=other))
  assert len(with_path.eval) == 16 and with_path.summary['eval']['kept'] == 16
  capped = pipeline.load(_data(id_file, eval_path=other, eval_max_examples=10, max_examples=50))
  assert (len(capped.train), len(capped.eval)) == (50, 10)
  assert capped.eval[9]['prompt_ids'].tolist() == _id_rows(n=16, seed=1)[9]['prompt_ids']
  folder = tmp_path / 'folder'
  folder.mkdir()
  _write(folder / 'train.jsonl', _id_rows())
  _write(folder / 'test.jsonl', _id_rows(n=24, seed=2))
  from_folder = pipeline.load(_data(folder))
  assert (len(from_folder.train), len(from_folder.eval)) == (100, 24)
  assert pipeline.load(_data(folder, eval_split='')).eval is None
  datasets.Dataset.from_list(_id_rows()).save_to_disk(str(tmp_path / 'saved'))
  saved = pipeline.load(_data(tmp_path / 'saved'))
  assert len(saved.train) == 100 and saved.eval is None  # one saved Dataset is the train split


def test_size_and_vocabulary_errors(id_file):
  data = _data(id_file, batch_size=128)
  with pytest.raises(sources.DataSourceError, match='fewer than one batch'):
    pipeline.train_iterator(pipeline.load(data).train, data, layout_lib.from_config(data))
  with pytest.raises(sources.DataSourceError, match='vocabulary has 256'):
    pipeline.load(_data(id_file), vocab_size=256)
  with pytest.raises(sources.DataSourceError, match='eval_holdout'):
    pipeline.load(_data(id_file, eval_holdout=100))


def test_synthetic_source():
  data = defaults.data_config()
  data.batch_size = 16
  loaded = pipeline.load(data, vocab_size=128)
  assert len(loaded.train) == data.synthetic.num_pairs and loaded.eval is None
  assert loaded.summary['train'] == dict(rows=256, kept=256, dropped={}, truncated={
      'prompt': 0, 'response': 0})
  batch = next(pipeline.train_iterator(loaded.train, data, layout_lib.from_config(data)))
  assert batch['chosen_input_ids'].shape == (16, 128) and batch['chosen_input_ids'].max() < 128


def test_hh_text_pipeline_counts_drops_and_fits_buckets(tmp_path):
  tok = tokenizer_util.build_tokenizer(tmp_path / 'tok', chat_template=True)
  data = _data(HH_FIXTURE, source='hh', tokenizer=tok, max_length=128, max_prompt_length=64,
               length_buckets=(32, 64, 128), batch_size=4, max_examples=0)
  loaded = pipeline.load(data, vocab_size=384)
  assert loaded.summary['train']['dropped'] == {
      'empty_response': 2, 'identical_responses': 1, 'no_assistant_turn': 1, 'no_human_turn': 1,
      'prompt_mismatch': 2}
  assert loaded.summary['train']['kept'] == 13 and loaded.summary['train']['rows'] == 20
  # Truncation counts agree with the untruncated lengths.
  whole = pipeline.load(_data(HH_FIXTURE, source='hh', tokenizer=tok, max_length=1024,
                              max_prompt_length=512, length_buckets=(1024,))).train
  n = np.asarray([[len(whole[i][k]) for k in ('prompt_ids', 'chosen_ids', 'rejected_ids')]
                  for i in range(len(whole))])
  longer = n[:, 1:].max(axis=1)
  prompt_cut = (n[:, 0] + longer > 128) & (n[:, 0] > 64)
  response_cut = np.where(prompt_cut, 64, n[:, 0]) + longer > 128
  assert loaded.summary['train']['truncated'] == {'prompt': prompt_cut.sum(),
                                                  'response': response_cut.sum()}
  assert prompt_cut.sum() >= 1 and response_cut.sum() >= 1
  assert (loaded.train.lengths <= 128).all()
  for batch in pipeline.train_iterator(loaded.train, data, layout_lib.from_config(data)):
    assert batch['chosen_input_ids'].shape[1] in (32, 64, 128)
    assert batch['rejected_loss_mask'].sum(axis=1).min() >= 1
  limited = pipeline.load(_data(HH_FIXTURE, source='hh', tokenizer=tok, max_examples=5))
  assert limited.summary['train']['kept'] == 5 and len(limited.train) == 5


def test_impossible_log_probs_are_dropped_and_counted(tmp_path):
  rows = _id_rows(20, logps=True)
  rows[3]['chosen_logps'] = float('nan')
  rows[4]['ref_rejected_logps'] = float('inf')
  rows[5]['rejected_logps'] = 2.0
  rows[6]['ref_rejected_logps'] = None  # one side only: a malformed row, not a drop
  path = tmp_path / 'p.jsonl'
  # json.dumps writes NaN and Infinity, as Python and pandas do.
  with pytest.raises(sources.MalformedRowError, match=r'row 6 of .*p\.jsonl .* is malformed: '
                     'it has reference log-probs for only one side'):
    pipeline.load(_data(_write(path, rows)))
  del rows[6]
  data = pipeline.load(_data(_write(path, rows)))
  assert data.summary['train']['dropped'] == {'nonfinite_logps': 2, 'positive_logps': 1}
  assert data.summary['train']['kept'] == len(data.train) == 16
  assert np.isfinite(data.train.columns['behavior_chosen_logps']).all()
  assert (data.train.columns['reference_rejected_logps'] <= 0).all()
  assert pipeline.describe(data.summary) == [
      'data train: kept 16 of 19 rows; dropped 2 nonfinite_logps, 1 positive_logps']


def test_every_row_dropped_is_one_sentence_with_the_reasons(tmp_path):
  rows = [dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[5, 2])] * 30 + [
      dict(prompt_ids=[1, 4], chosen_ids=[], rejected_ids=[6, 2])] * 10
  path = _write(tmp_path / 'f.jsonl', rows)
  with pytest.raises(sources.DataSourceError) as e:
    pipeline.load(_data(path))
  assert str(e.value).startswith(f'all 40 rows of {path} (train) were dropped: 30 '
                                 'identical_responses, 10 empty_response; ')


def test_rows_that_are_not_objects_are_refused_with_their_index(tmp_path):
  rows = _id_rows(3)
  (tmp_path / 'l.json').write_text(json.dumps([rows[0], [1, 2], rows[2]]))
  with pytest.raises(sources.MalformedRowError, match=r'row 1 of .*l\.json \(train\) is a list, '
                     'not an object'):
    pipeline.load(_data(tmp_path / 'l.json'))
