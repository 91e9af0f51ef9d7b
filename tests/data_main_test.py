"""`python -m isdaa_jax.data --dump`: the preview rows and summary a user reads."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tokenizer_util
from configs import hh
from isdaa_jax.data import __main__ as data_main
from isdaa_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
HH_FIXTURE = REPO / 'tests' / 'fixtures' / 'data' / 'hh_small.jsonl'
ROW_KEYS = {'prompt', 'chosen', 'rejected', 'prompt_tokens', 'chosen_tokens', 'rejected_tokens'}


def _run(*args):
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'isdaa_jax.data', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_writes_rows_and_summary(tmp_path):
  tok = tokenizer_util.build_tokenizer(tmp_path / 'tok')
  out = tmp_path / 'preview' / 'hh.jsonl'
  result = _run('--config=configs/hh.py', f'--config.data.path={HH_FIXTURE}',
                f'--config.data.tokenizer={tok}', f'--dump={out}')
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in out.open(encoding='utf-8')]
  summary = json.loads((tmp_path / 'preview' / 'hh.summary.json').read_text())
  assert summary['kept'] == len(rows) == 13
  assert summary['dropped'] == {'empty_response': 2, 'identical_responses': 1,
                                'no_assistant_turn': 1, 'no_human_turn': 1, 'prompt_mismatch': 2}
  assert summary['rows'] == 20 and summary['source'] == 'hh' and summary['split'] == 'train'
  for row in rows:
    assert set(row) == ROW_KEYS
    assert all(set(m) == {'role', 'content'} for m in row['prompt'])
    assert row['prompt'][-1]['role'] == 'user'
    assert isinstance(row['chosen'], str) and isinstance(row['rejected'], str)
    for key in ('prompt_tokens', 'chosen_tokens', 'rejected_tokens'):
      assert row[key] and all(isinstance(t, int) for t in row[key])
    assert row['prompt_tokens'][0] == 1 and row['prompt_tokens'].count(1) == 1
    for side in ('chosen_tokens', 'rejected_tokens'):
      n = len(row['prompt_tokens']) + len(row[side])
      assert n <= 512
      # Responses end with EOS unless they were cut at hh.py's max_length.
      assert row[side][-1] == 2 or n == 512
  unicode = next(r for r in rows if r['chosen'].startswith('Se dice'))
  assert unicode['chosen'] == 'Se dice ありがとう (arigatō). 😊'
  # With hh.py's lengths (512 / 256) the fixture's 24-turn prompt and its 600-character response
  # are cut.
  assert summary['truncated'] == {'prompt': 1, 'response': 1}
  assert max(len(r['prompt_tokens']) for r in rows) == 256


def test_cli_limit_and_token_id_rows(tmp_path):
  config = hh.get_config()
  rows = [dict(prompt_ids=[1, 5 + i], chosen_ids=[7, 2], rejected_ids=[8, 9, 2],
               chosen_logps=-1.0, rejected_logps=-2.0) for i in range(6)]
  data_path = tmp_path / 'ids.jsonl'
  data_path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config.data.path = str(data_path)
  summary = data_main.dump(config, str(tmp_path / 'ids.jsonl.out.jsonl'), limit=4)
  assert summary['kept'] == 4 and summary['rows'] == 4
  dumped = [json.loads(line) for line in (tmp_path / 'ids.jsonl.out.jsonl').open()]
  assert dumped[3] == dict(prompt=None, chosen=None, rejected=None, prompt_tokens=[1, 8],
                           chosen_tokens=[7, 2], rejected_tokens=[8, 9, 2],
                           behavior_chosen_logps=-1.0, behavior_rejected_logps=-2.0)
  assert json.loads((tmp_path / 'ids.jsonl.out.summary.json').read_text()) == summary


def test_cli_errors_are_one_sentence(tmp_path):
  result = _run('--config=configs/hh.py', f'--config.data.path={tmp_path / "missing.jsonl"}',
                f'--dump={tmp_path / "x.jsonl"}')
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'config.data.path' in last
  assert 'Traceback' not in result.stderr


def test_every_row_dropped_leaves_the_earlier_preview_and_writes_the_counts(tmp_path):
  config = hh.get_config()
  rows = [dict(prompt_ids=[1, 5], chosen_ids=[7, 2], rejected_ids=[7, 2]) for _ in range(3)]
  data_path = tmp_path / 'ids.jsonl'
  data_path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config.data.path = str(data_path)
  out = tmp_path / 'preview.jsonl'
  out.write_text('{"earlier": true}\n')
  with pytest.raises(UserError) as e:
    data_main.dump(config, str(out), limit=0)
  assert str(e.value) == (
      f'all 3 rows of {data_path} (train) were dropped: 3 identical_responses; check '
      f'config.data.source and the rows; nothing written to {out} (the counts are in '
      f'{tmp_path / "preview.summary.json"})')
  assert out.read_text() == '{"earlier": true}\n'
  assert json.loads((tmp_path / 'preview.summary.json').read_text())['dropped'] == {
      'identical_responses': 3}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ids.jsonl', 'preview.jsonl',
                                                         'preview.summary.json']
  with pytest.raises(UserError, match='is config.data.path; write the preview to another file'):
    data_main.dump(config, str(data_path), limit=0)
  assert data_path.read_text() == ''.join(json.dumps(r) + '\n' for r in rows)
