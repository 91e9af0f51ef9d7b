"""config.json and data_summary.json: written once a run is accepted, earlier configs kept."""

import json

import pytest

import main_test
from isdaa_jax import checkpoint, run_files, train


def _config(data_path, num_steps):
  cfg = main_test._quiet_tiny(num_steps)  # pylint: disable=protected-access
  cfg.data.source, cfg.data.path = 'pairs', str(data_path)
  cfg.train.eval_every = 0
  return cfg


def _archived(workdir):
  return sorted(p.name for p in workdir.glob('config.*.json'))


def test_a_rejected_run_leaves_config_and_summary_alone(tmp_path, capsys):
  rows = [dict(prompt_ids=[1, 4 + i], chosen_ids=[5 + i, 2], rejected_ids=[6 + i, 9, 2])
          for i in range(36)]
  rows += [dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[5, 2])] * 3
  rows += [dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[6, 2],
                chosen_logps=float('nan'), rejected_logps=-1.0)]
  data_path = tmp_path / 'pairs.jsonl'
  data_path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  workdir = tmp_path / 'run'
  train.run(_config(data_path, 2), workdir)
  assert capsys.readouterr().out.splitlines()[0] == (
      'data train: kept 36 of 40 rows (16 of them held out for eval); dropped 3 '
      'identical_responses, 1 nonfinite_logps')
  summary = json.loads((workdir / 'data_summary.json').read_text())
  assert summary['train']['dropped'] == {'identical_responses': 3, 'nonfinite_logps': 1}
  assert summary['train']['rows'] == 40 and summary['eval'] == {'held_out_from_train': 16}
  first = (workdir / 'config.json').read_bytes()
  assert json.loads(first)['train']['num_steps'] == 2

  # A model that does not match the checkpoints: refused, and nothing is rewritten.
  rejected = _config(data_path, 4)
  rejected.model.hidden_size = 64
  with pytest.raises(checkpoint.CheckpointError):
    train.run(rejected, workdir)
  assert (workdir / 'config.json').read_bytes() == first and _archived(workdir) == []

  # Accepted with a different config: the earlier one is kept beside the new one.
  train.run(_config(data_path, 3), workdir)
  assert json.loads((workdir / 'config.json').read_text())['train']['num_steps'] == 3
  [archived] = _archived(workdir)
  assert (workdir / archived).read_bytes() == first
  # The same config again (resuming at its last step) archives nothing.
  train.run(_config(data_path, 3), workdir)
  assert _archived(workdir) == [archived]


def test_write_config_never_overwrites_an_archived_one(tmp_path):
  for n in range(3):
    run_files.write_config(tmp_path, {'n': n})
  kept = sorted(json.loads(p.read_text())['n'] for p in tmp_path.glob('config.*.json'))
  assert kept == [0, 1]  # written within one second: distinct names all the same
  assert json.loads((tmp_path / 'config.json').read_text()) == {'n': 2}
  (tmp_path / 'config.json').write_text('{not json')
  run_files.write_config(tmp_path, {'n': 3})
  assert len(list(tmp_path.glob('config.*.json'))) == 3
