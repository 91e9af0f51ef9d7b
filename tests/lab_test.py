"""A lab smoke run (seconds): the whole study on a tiny grid writes every file with its schema."""

import json

import pytest

from isdaa_jax.lab import defaults as lab_defaults
from isdaa_jax.lab import results as lab_results
from isdaa_jax.lab import study


def test_lab_smoke_run_of_the_sweep_writes_results_report_and_plots(tmp_path):
  cfg = lab_defaults.get_config('quick')
  cfg.lab.methods = ('dpo',)
  cfg.lab.betas.dpo = (0.1, 0.5)
  cfg.lab.seeds = (0, 1)
  cfg.lab.sft.num_demos, cfg.lab.sft.steps = 256, 20
  cfg.lab.num_pairs = 64
  cfg.lab.eval_prompts = 16
  cfg.lab.displacement.alphas = (0.0, 0.5)
  cfg.lab.ablations.method = 'dpo'
  cfg.lab.ablations.order = ('lower_clip',)
  cfg.data.batch_size = 16
  results = study.run_study(cfg, tmp_path)

  on_disk = json.loads((tmp_path / 'results.json').read_text())
  assert on_disk['verdict'] == results['verdict']
  meta = on_disk['meta']
  # One epoch of the kept pairs, in steps of 16.
  assert meta['steps'] == meta['pairs_pairs'] // 16 and meta['steps_per_epoch'] >= meta['steps']
  assert meta['runs'] == 2 * 2 * 2 + 2 * 2 * 2 + 2 * 2  # sweep + 2 alphas + ablation (on only)
  points = on_disk['points']
  steps = sorted({p['step'] for p in points})
  assert steps[0] == 0 and steps[-1] == meta['steps'] and all(s % 2 == 0 for s in steps[:-1])
  assert len(points) == meta['runs'] * len(steps)
  for p in points:
    assert set(p) >= {'method', 'variant', 'beta', 'importance', 'seed', 'step', 'epoch', 'kl',
                      'gold', 'win_rate'}
    assert 0.0 <= p['win_rate'] <= 1.0 and p['epoch'] <= 1.0
    if p['step']:
      # Without the weight its ESS is the whole batch.
      assert p['importance'] or p['is/ess'] == 16.0
  # At step 0 the policy is the reference: zero KL, and every run samples the same responses.
  first = [p for p in points if p['step'] == 0]
  assert all(abs(p['kl']) < 1e-3 for p in first)
  assert len({round(p['gold'], 6) for p in first if p['seed'] == 0}) == 1
  rows = on_disk['summary']
  assert {(r['variant'], r['importance']) for r in rows} == {
      ('', False), ('', True), ('alpha=0', False), ('alpha=0', True), ('alpha=0.5', False),
      ('alpha=0.5', True), ('lower_clip', True)}
  assert all(0.0 <= r['peak_epoch'] <= 1.0 for r in rows)

  report = (tmp_path / 'report.md').read_text()
  for heading in ('## Verdict', '## dpo', '## Importance ablations (not in the paper)',
                  '## AlphaPO likelihood displacement', 'Paired by seed'):
    assert heading in report
  for png in ('gold_vs_sqrt_kl.png', 'gold_vs_step.png', 'difference_vs_beta.png',
              'alphapo_displacement.png'):
    assert (tmp_path / png).stat().st_size > 1000
  assert (tmp_path / 'reference' / 'model.safetensors').exists()
  # Each sweep run's final policy, for notebooks/loss_surface.py.
  assert (tmp_path / 'runs' / study.run_name('dpo', 0.5, True, 1) / 'model.safetensors').exists()
  row = json.loads((tmp_path / 'pairs.jsonl').read_text().splitlines()[0])
  assert {'prompt_ids', 'chosen_ids', 'rejected_ids', 'reference_chosen_logps'} <= set(row)


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
