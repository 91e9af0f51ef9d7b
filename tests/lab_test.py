"""A lab smoke run (seconds): the whole study on a tiny grid writes every file with its schema."""

import json

import pytest

from isdaa_jax.lab import defaults as lab_defaults
from isdaa_jax.lab import results as lab_results
from isdaa_jax.lab import study
from isdaa_jax.metrics_writer import read_metrics


def test_lab_smoke_run_writes_results_report_and_plots(tmp_path):
  cfg = lab_defaults.get_config('quick')
  cfg.lab.methods = ('dpo',)
  cfg.lab.seeds = (0,)
  cfg.lab.sft.num_demos, cfg.lab.sft.steps = 256, 20
  cfg.lab.num_pairs = 96
  cfg.lab.eval_prompts = 16
  cfg.lab.eval_every = 2
  cfg.data.batch_size = 16
  cfg.train.num_steps = 4
  results = study.run_study(cfg, tmp_path)

  on_disk = json.loads((tmp_path / 'results.json').read_text())
  assert on_disk['verdict'] == results['verdict']
  assert on_disk['meta']['steps'] == 4 and on_disk['meta']['pairs_pairs'] > 80
  points = on_disk['points']
  # dpo x {off, on} x steps {0, 2, 4}
  assert len(points) == 6
  assert {(p['importance'], p['step']) for p in points} == {
      (i, s) for i in (False, True) for s in (0, 2, 4)}
  for p in points:
    assert set(p) >= {'method', 'beta', 'importance', 'seed', 'step', 'kl', 'kl_stderr', 'gold',
                      'gold_stderr', 'length', 'win_rate'}
    assert 0.0 <= p['win_rate'] <= 1.0
  # At step 0 the policy is the reference: zero KL.
  assert all(abs(p['kl']) < 1e-3 for p in points if p['step'] == 0)
  rows = on_disk['summary']
  assert len(rows) == 2 and {r['importance'] for r in rows} == {False, True}
  assert {'peak_gold', 'final_gold', 'kl_at_peak', 'fit_a', 'fit_b'} <= set(rows[0])

  report = (tmp_path / 'report.md').read_text()
  assert '## Verdict' in report and '## dpo' in report and 'importance weight' in report
  assert (tmp_path / 'gold_vs_sqrt_kl.png').stat().st_size > 1000
  assert (tmp_path / 'gold_vs_step.png').stat().st_size > 1000
  assert (tmp_path / 'reference' / 'model.safetensors').exists()
  first = json.loads((tmp_path / 'pairs.jsonl').read_text().splitlines()[0])
  assert {'prompt_ids', 'chosen_ids', 'rejected_ids', 'reference_chosen_logps'} <= set(first)
  # The runs went through the real loop: metrics with lab scalars, and a checkpoint.
  run = tmp_path / 'runs' / 'dpo-b0.1-is1-s0'
  logged = read_metrics(run)
  assert any('lab/gold' in r for r in logged) and any('is/weight_mean' in r for r in logged)
  assert (run / 'checkpoints' / '4').exists()


def test_find_or_run_reads_finished_results_and_never_overwrites_an_unfinished_run(tmp_path):
  done = tmp_path / 'done'
  done.mkdir()
  (done / 'results.json').write_text('{"meta": {"mode": "quick"}}')
  assert lab_results.find_or_run(done, smoke=True, explicit=True, cwd=tmp_path) == (
      done, {'meta': {'mode': 'quick'}})
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  (unfinished / 'metrics.jsonl').write_text('')
  with pytest.raises(FileExistsError, match='holds an unfinished lab run'):
    lab_results.find_or_run(unfinished, smoke=True, explicit=True, cwd=tmp_path)
