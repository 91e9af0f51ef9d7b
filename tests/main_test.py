"""End to end through `isdaa_jax.main` and `train.run`: metrics, resume, NaN stop, SIGTERM, errors."""

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from configs import tiny
from isdaa_jax import checkpoint, train
from isdaa_jax.metrics_writer import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir, *overrides, env=None, **kw):
  cmd = [sys.executable, '-m', 'isdaa_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', *overrides]
  e = dict(os.environ, **(env or {}))
  return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300, **kw)


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def test_tiny_runs_end_to_end_and_resumes(tmp_path):
  res = _main(tmp_path, '--config.train.num_steps=6', '--config.checkpoint.every_steps=4')
  assert res.returncode == 0, res.stderr[-3000:]
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 6
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == [4, 6]  # the last step is always checkpointed
  assert (tmp_path / 'hf' / 'model.safetensors').exists()
  res = _main(tmp_path, '--config.train.num_steps=8', '--config.checkpoint.every_steps=4')
  assert res.returncode == 0, res.stderr[-3000:]
  assert sorted(_losses(tmp_path)) == list(range(1, 9))


def _quiet_tiny(num_steps):
  cfg = tiny.get_config()
  cfg.train.num_steps = num_steps
  cfg.checkpoint.every_steps = 1000
  cfg.checkpoint.export_hf = False
  cfg.train.progress_bar = False
  cfg.train.tensorboard = False
  return cfg


def test_resume_is_exact(tmp_path):
  """12 steps straight == 6 steps, preemption (SIGTERM) and restart, 6 more: every loss equal."""
  train.run(_quiet_tiny(12), tmp_path / 'straight')

  def preempt(step, policy):
    if step == 6:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  train.run(_quiet_tiny(12), tmp_path / 'split', step_hooks=((6, preempt),))
  assert sorted(_losses(tmp_path / 'split')) == list(range(1, 7))
  train.run(_quiet_tiny(12), tmp_path / 'split')
  straight, split = _losses(tmp_path / 'straight'), _losses(tmp_path / 'split')
  assert sorted(split) == list(range(1, 13))
  assert [split[s] for s in range(1, 13)] == [straight[s] for s in range(1, 13)]


def test_nan_loss_stops_with_one_message_and_keeps_the_last_good_checkpoint(tmp_path):
  # Warmup from 0: step 1 updates nothing (a good checkpoint), step 2's rate of ~1e28 blows the
  # parameters up. The loss of step 2 is still finite (computed before the update): the
  # parameter check is what keeps the blown-up state out of the checkpoint.
  res = _main(tmp_path, '--config.optimizer.learning_rate=1e30',
              '--config.optimizer.warmup_steps=29', '--config.checkpoint.every_steps=1',
              '--config.train.num_steps=30', '--config.train.eval_every=0')
  assert res.returncode == 1
  lines = [l for l in res.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'param_norm became non-finite at step 2' in lines[0], \
      res.stderr[-2000:]
  assert 'learning_rate' in lines[0] and 'Traceback' not in res.stderr
  assert 'last good checkpoint (step 1)' in lines[0]
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [1]
  assert sorted(_losses(tmp_path)) == [1]  # the diverged step is reported, not logged
  # The kept checkpoint holds finite parameters: resuming with a sane rate trains on.
  res2 = _main(tmp_path, '--config.train.num_steps=3', '--config.train.eval_every=0',
               '--config.checkpoint.export_hf=False')
  assert res2.returncode == 0, res2.stderr[-2000:]
  rows = [r for r in read_metrics(tmp_path) if r['step'] > 1 and 'loss' in r]
  assert [r['step'] for r in rows] == [2, 3]
  assert all(isinstance(r['loss'], float) and isinstance(r['param_norm'], float) for r in rows)


def _signal_after_three_steps(tmp_path, sig, *extra):
  """Starts a long tiny run, sends `sig` once 3 steps are logged; (process, stderr) at its exit."""
  cmd = [sys.executable, '-m', 'isdaa_jax.main', '--config=configs/tiny.py',
         f'--workdir={tmp_path}', '--config.train.num_steps=100000',
         '--config.checkpoint.every_steps=100000', '--config.train.eval_every=0', *extra]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while time.time() < deadline and len(_losses(tmp_path)) < 3:
    time.sleep(0.5)
  assert len(_losses(tmp_path)) >= 3, 'training did not start'
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  return proc, err


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
  proc, err = _signal_after_three_steps(tmp_path, signal.SIGTERM)
  assert proc.returncode == 0, err[-2000:]
  saved = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 100000


def test_first_sigint_checkpoints_exits_130_and_resume_continues(tmp_path):
  proc, err = _signal_after_three_steps(tmp_path, signal.SIGINT, '--config.train.log_every=1',
                                        '--config.train.progress_bar=False')
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1] == (
      f'interrupted: checkpoint saved in {tmp_path / "checkpoints"}; rerun the same command to '
      'resume')
  saved = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  stopped = max(_losses(tmp_path))
  assert saved == [stopped] and stopped >= 3  # saved at the step it stopped, nothing else
  res = _main(tmp_path, f'--config.train.num_steps={stopped + 2}', '--config.train.eval_every=0',
              '--config.checkpoint.export_hf=False')
  assert res.returncode == 0, res.stderr[-2000:]
  assert sorted(_losses(tmp_path))[-3:] == [stopped, stopped + 1, stopped + 2]


def test_bad_config_value_is_one_line(tmp_path):
  res = _main(tmp_path, '--config.loss.name=orpo')
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1].startswith("error: config.loss.name='orpo'")
  assert 'Traceback' not in res.stderr


def test_unknown_override_key_is_rejected(tmp_path):
  res = _main(tmp_path, '--config.loss.bta=0.3')
  assert res.returncode != 0 and 'bta' in res.stderr


def test_generation_eval_inside_training_logs_sample_metrics(tmp_path):
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text('\n'.join(json.dumps({'prompt_ids': [1, 5 + i, 9]}) for i in range(8)))
  res = _main(tmp_path / 'run', '--config.train.num_steps=4', '--config.sample_eval.every=2',
              f'--config.sample_eval.prompts={prompts}', '--config.sample_eval.max_new_tokens=4',
              '--config.sample_eval.gold=tests.gold_fixture:length_reward',
              '--config.train.eval_every=0')
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [r for r in read_metrics(tmp_path / 'run') if 'sample/kl' in r]
  assert [r['step'] for r in rows] == [0, 2, 4]
  assert abs(rows[0]['sample/kl']) < 1e-3  # the policy starts as the reference
  assert all(0.0 <= r['sample/win_rate'] <= 1.0 for r in rows)


def _data_cli(*overrides):
  cmd = [sys.executable, '-m', 'isdaa_jax.data', '--config=configs/tiny.py', *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_line(res) -> str:
  assert res.returncode == 1, res.stderr[-2000:]
  assert 'Traceback' not in res.stderr, res.stderr[-2000:]
  return res.stderr.strip().splitlines()[-1]


def test_damaged_data_file_is_the_same_sentence_from_main_and_the_data_cli(tmp_path):
  rows = ''.join(json.dumps(dict(prompt_ids=[1, 4 + i % 50], chosen_ids=[5, 2],
                                 rejected_ids=[6, 2])) + '\n' for i in range(400))
  whole = gzip.compress(rows.encode())
  path = tmp_path / 'pairs.jsonl.gz'
  path.write_bytes(whole[:len(whole) // 2])
  data = ('--config.data.source=pairs', f'--config.data.path={path}')
  from_main = _error_line(_main(tmp_path / 'run', *data))
  from_cli = _error_line(_data_cli(*data, f'--dump={tmp_path / "dump.jsonl"}'))
  assert from_main == from_cli
  assert from_main.startswith(f'error: {path} ends before its gzip stream does (after line ')
  assert not (tmp_path / 'run' / 'config.json').exists()  # a rejected run records nothing


def test_every_row_dropped_names_the_file_and_the_reasons(tmp_path):
  rows = [dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[5, 2])] * 30 + [
      dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[])] * 10
  path = tmp_path / 'f.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  line = _error_line(_main(tmp_path / 'run', '--config.data.source=pairs',
                           f'--config.data.path={path}'))
  assert line.startswith(f'error: all 40 rows of {path} (train) were dropped: 30 '
                         'identical_responses, 10 empty_response; ')


def _blowup_config(num_steps, max_ratio):
  # Warmup from 0: step 1 updates nothing, step 2's rate of 5e3 multiplies the weight norm by
  # ~1e5 while every value stays finite.
  cfg = _quiet_tiny(num_steps)
  cfg.optimizer.learning_rate = 1e4
  cfg.checkpoint.every_steps = 1
  cfg.train.eval_every = 0
  cfg.train.max_param_norm_ratio = max_ratio
  return cfg


def test_parameter_norm_blowup_is_divergence_and_never_the_last_good_checkpoint(tmp_path):
  with pytest.raises(train.TrainingDiverged) as e:
    train.run(_blowup_config(5, 100.0), tmp_path / 'a')
  message = str(e.value)
  assert message.startswith('param_norm grew to ') and (
      '(over config.train.max_param_norm_ratio=100) at step 2; the last good checkpoint '
      '(step 1)') in message, message
  saved = sorted(int(p.name) for p in (tmp_path / 'a' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert saved == [1]
  # Off (inf), the same run trains on and checkpoints the blown-up weights ...
  train.run(_blowup_config(2, float('inf')), tmp_path / 'b')
  norms = {r['step']: r['param_norm'] for r in read_metrics(tmp_path / 'b') if 'param_norm' in r}
  assert norms[2] > 100 * norms[1]
  # ... which a run with the check refuses to resume from, naming that checkpoint.
  with pytest.raises(train.TrainingDiverged, match=r'the checkpoint at step 2 in .* already '
                     r'diverged: param_norm grew to .*; move it out of the folder'):
    train.run(_blowup_config(4, 100.0), tmp_path / 'b')


def test_describe_norm_blowup_thresholds():
  assert train.describe_norm_blowup(99.0, 1.0, 100.0) is None
  assert train.describe_norm_blowup(101.0, 1.0, 100.0) == (
      'param_norm grew to 101, 101 times its starting 1 (over '
      'config.train.max_param_norm_ratio=100)')
  for off in (0.0, float('inf')):
    assert train.describe_norm_blowup(1e30, 1.0, off) is None


def test_export_is_a_whole_hf_folder_and_no_eval_split_logs_no_eval_rows(tmp_path):
  import tokenizer_util  # pylint: disable=import-outside-toplevel
  from isdaa_jax.data import tokenize  # pylint: disable=import-outside-toplevel
  tok_dir = tokenizer_util.build_tokenizer(tmp_path / 'tok', chat_template=True)
  cfg = _quiet_tiny(2)
  cfg.checkpoint.export_hf = True
  cfg.model.vocab_size = 384
  d = cfg.data
  d.source, d.tokenizer = 'hh', tok_dir
  d.path = str(REPO / 'tests' / 'fixtures' / 'data' / 'hh_small.jsonl')
  d.eval_holdout = 0  # a single file and no holdout: there is no eval split
  cfg.train.eval_every = 1
  train.run(cfg, tmp_path / 'run')
  rows = read_metrics(tmp_path / 'run')
  assert all(len(r) > 1 for r in rows), [r for r in rows if len(r) <= 1]
  assert not any(k.startswith('eval/') for r in rows for k in r)
  hf_dir = tmp_path / 'run' / 'hf'
  exported = tokenize.load_tokenizer(str(hf_dir))
  source = tokenize.load_tokenizer(tok_dir)
  text = 'Human: hello there\n\nAssistant: hi'
  assert exported(text)['input_ids'] == source(text)['input_ids']
  assert exported.chat_template == source.chat_template and exported.chat_template
  config = json.loads((hf_dir / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id']) == (source.bos_token_id,
                                                               source.eos_token_id)
  assert config['architectures'] == ['LlamaForCausalLM']
