# %% [markdown]
# # Reward over-optimization in the lab, with and without the importance weight
#
# The over-optimization lab (`isdaa_jax.lab`) trains each DAA on preference pairs labelled by a
# known gold reward, with and without the IS-DAA importance weight, and records the gold reward
# and the KL to the reference of policy samples as training goes. This notebook reads its
# `results.json` and draws:
#
# 1. the gold reward against `d = sqrt(KL(policy || reference))` per method, with the fitted
#    `R(d) = d (a - b log d)` curves (Gao et al. 2023) from `isdaa_jax.lab.report`;
# 2. the training dynamics of the chosen and rejected log-probs (likelihood displacement) from
#    each run's `metrics.jsonl`.
#
# Where the lab ran: `ISDAA_LAB_DIR` (default `runs/lab-quick`, what
# `python -m isdaa_jax.lab --config=configs/lab.py:quick --workdir=runs/lab-quick` writes). When it
# holds no `results.json` the notebook runs the lab there first (the quick config, ~2 minutes on 2
# CPU cores). `ISDAA_NOTEBOOK_FAST=1` (the CI test) runs a smoke grid of one DPO pair of 4-step
# runs instead, in a temporary folder unless `ISDAA_LAB_DIR` is set. Built from
# `notebooks/overoptimization.py` by `python notebooks/build_notebooks.py`; edit that file, not
# the `.ipynb`.

# %%
import collections
import json
import math
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

# Lab folders are relative to the repository root (the folder holding configs/lab.py), or to the
# working directory outside a checkout.
ROOT = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
             if (p / 'configs' / 'lab.py').is_file()), pathlib.Path.cwd())
from isdaa_jax.lab import report, study
from isdaa_jax.lab import results as lab_results
from isdaa_jax.metrics_writer import read_metrics

FAST = os.environ.get('ISDAA_NOTEBOOK_FAST') == '1'
plt.rcParams.update({'figure.dpi': 60 if FAST else 100, 'axes.grid': True, 'grid.alpha': 0.3})

# %% [markdown]
# ## The lab's results

# %%
LAB_DIR = pathlib.Path(os.environ.get('ISDAA_LAB_DIR', 'runs/lab-quick'))
LAB_DIR = LAB_DIR if LAB_DIR.is_absolute() else ROOT / LAB_DIR

LAB_DIR, results = lab_results.find_or_run(LAB_DIR, smoke=FAST,
                                           explicit='ISDAA_LAB_DIR' in os.environ, cwd=ROOT)
points = results['points']
print(f'lab: {LAB_DIR}')
print(json.dumps(results['meta'], indent=1))
print(results['verdict'])

# %% [markdown]
# One row per (method, importance weight, beta): each statistic is the mean over seeds and, with
# several seeds, the half-width of its 95% interval (`_ci95`). `drop` is the peak-to-final fall of
# the gold reward: the over-optimization. The rows are recomputed here from the points by
# `report.summarize`, and must agree with the ones stored in `results.json`.

# %%
rows = report.summarize(points)
np.testing.assert_equal(rows, results['summary'])  # NaNs (single-seed intervals) compare equal
COLUMNS = ['method', 'beta', 'importance', 'seeds', 'peak_gold', 'final_gold', 'drop',
           'kl_at_peak', 'final_kl', 'fit_a', 'fit_b']
pd.DataFrame(rows)[COLUMNS].round(3)

# %% [markdown]
# ## Gold reward against sqrt(KL)
#
# Each thin line is one training run (one seed), from the reference at the origin outwards as
# training moves the policy away from it; error bars are the standard errors of the gold reward
# over the evaluation prompts. Red: without the importance weight; blue: with it. Thick lines: the
# fitted `R(d) = d (a - b log d)` of each (method, beta, importance), averaged over seeds and added
# to the reference's gold reward. The curve rises while `a` dominates and turns down past
# `d = exp(a / b - 1)` when `b > 0`: over-optimization. A fit needs at least two evaluations away
# from the reference, so runs that never left it have none.

# %%
COLOR = {False: 'tab:red', True: 'tab:blue'}
LABEL = {False: 'without importance weight', True: 'with importance weight'}

runs = collections.defaultdict(list)  # (method, importance, beta, seed) -> points by step
for p in points:
  runs[report.run_key(p) + (p['seed'],)].append(p)
runs = {key: sorted(pts, key=lambda p: p['step']) for key, pts in sorted(runs.items())}
methods = sorted({p['method'] for p in points})
betas = {m: sorted({p['beta'] for p in points if p['method'] == m}) for m in methods}
sqrt_kl = lambda pts: np.sqrt(np.maximum([p['kl'] for p in pts], 0.0))  # sample KL can dip < 0

for pts in runs.values():
  assert abs(pts[0]['kl']) < 1e-3 and pts[0]['step'] == 0, 'every run starts at the reference'

fig, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 8.5), squeeze=False)
for col, method in enumerate(methods):
  ax_d, ax_step = axes[:, col]
  for (m, imp, beta, seed), pts in runs.items():
    if m != method:
      continue
    style = dict(color=COLOR[imp], alpha=0.5, linewidth=1,
                 linestyle='-' if beta == betas[m][0] else '--')
    gold = [p['gold'] for p in pts]
    ax_d.errorbar(sqrt_kl(pts), gold, yerr=[p['gold_stderr'] for p in pts], marker='.',
                  capsize=2, **style)
    ax_step.plot([p['step'] for p in pts], gold, marker='.', **style)
  for row in rows:
    if row['method'] != method or not math.isfinite(row['fit_a']):
      continue
    group = [pts for key, pts in runs.items() if report.run_key(pts[0]) == report.run_key(row)]
    gold0 = np.mean([pts[0]['gold'] for pts in group])
    d = np.linspace(1e-3, max(sqrt_kl(pts).max() for pts in group), 200)
    ax_d.plot(d, gold0 + d * (row['fit_a'] - row['fit_b'] * np.log(d)),
              color=COLOR[row['importance']], linewidth=2.5,
              linestyle='-' if row['beta'] == betas[method][0] else '--')
  ax_d.set(title=f'{method}  (solid beta {betas[method][0]:g}'
           + (f', dashed {betas[method][-1]:g})' if len(betas[method]) > 1 else ')'),
           xlabel='d = sqrt KL(policy || reference)', ylabel='gold reward')
  ax_step.set(xlabel='step', ylabel='gold reward')
for imp in (False, True):
  axes[0, 0].plot([], [], color=COLOR[imp], label=LABEL[imp])
axes[0, 0].legend(fontsize='small')
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Likelihood displacement
#
# A DAA only asks for a wider margin between the chosen and the rejected response; nothing stops
# it from lowering both, the chosen one included (Razin et al. 2024, "likelihood displacement"),
# which moves probability mass onto responses neither in the data nor judged by it: room for
# over-optimization. The train step logs the batch means `logps/chosen` and `logps/rejected`
# (top row; a moving average over `WINDOW` steps, since each step sees a different batch) and the
# log-ratios to the reference `rewards/chosen / beta` and `rewards/rejected / beta` (bottom row;
# the reference of the same batch is subtracted, so they start at exactly 0). The importance
# weight down-weights pairs whose summed log-ratio has fallen, so it damps the push that drags
# both responses down.

# %%
def run_dir(key):
  """The folder `study.run_study` trained the run (method, importance, beta, seed) in."""
  method, importance, beta, seed = key
  return LAB_DIR / 'runs' / study.run_name(method, beta, importance, seed)


def train_rows(key):
  """The per-step training metrics of one run (hook rows, which carry lab/* only, left out)."""
  logged = read_metrics(run_dir(key))
  steps = [r for r in logged if 'logps/chosen' in r]
  # Cross-check: the gold rewards the run logged are the ones in results.json.
  logged_gold = {r['step']: r['lab/gold'] for r in logged if 'lab/gold' in r}
  assert logged_gold == {p['step']: p['gold'] for p in runs[key]}, run_dir(key)
  assert [r['step'] for r in steps] == list(range(1, results['meta']['steps'] + 1))
  return steps


def moving_average(x, window):
  x = np.asarray(x, np.float64)
  window = max(1, min(window, len(x)))
  return np.convolve(x, np.ones(window) / window, mode='valid')


WINDOW = max(1, results['meta']['steps'] // 20)
settings = [(m, b) for m in methods for b in betas[m]]
fig, axes = plt.subplots(2, len(settings), figsize=(5 * len(settings), 8), squeeze=False)
displacement = []
for col, (method, beta) in enumerate(settings):
  ax_lp, ax_ratio = axes[:, col]
  for key in runs:
    if key[:1] + key[2:3] != (method, beta):
      continue
    imp = key[1]
    metrics = train_rows(key)
    step = np.array([r['step'] for r in metrics])
    if imp:  # the first step's policy is the reference, so every weight is exactly 1
      assert abs(metrics[0]['is/weight_mean'] - 1.0) < 1e-5
    for side, linestyle in (('chosen', '-'), ('rejected', ':')):
      logp = [r[f'logps/{side}'] for r in metrics]
      ratio = np.array([r[f'rewards/{side}'] for r in metrics]) / beta
      ax_lp.plot(step[WINDOW - 1:], moving_average(logp, WINDOW), color=COLOR[imp],
                 linestyle=linestyle, alpha=0.7)
      ax_ratio.plot(step, ratio, color=COLOR[imp], linestyle=linestyle, alpha=0.7)
    tail = metrics[-max(1, len(metrics) // 10):]  # the last tenth of training
    displacement.append(dict(
        method=method, beta=beta, importance=imp, seed=key[3],
        chosen_log_ratio=np.mean([r['rewards/chosen'] for r in tail]) / beta,
        rejected_log_ratio=np.mean([r['rewards/rejected'] for r in tail]) / beta,
        margin=np.mean([r['rewards/margins'] for r in tail]) / beta,
        accuracy=np.mean([r['rewards/accuracies'] for r in tail]),
        weight_mean=np.mean([r['is/weight_mean'] for r in tail])))
  ax_lp.set(title=f'{method} (beta {beta:g})', xlabel='step',
            ylabel=f'summed log-prob (moving average of {WINDOW})')
  ax_ratio.axhline(0.0, color='k', linewidth=0.8)
  ax_ratio.set(xlabel='step', ylabel='log-ratio to the reference  log pi - log pi_ref')
for imp in (False, True):
  axes[0, 0].plot([], [], color=COLOR[imp], label=LABEL[imp])
axes[0, 0].plot([], [], color='gray', linestyle='-', label='chosen')
axes[0, 0].plot([], [], color='gray', linestyle=':', label='rejected')
axes[0, 0].legend(fontsize='small')
fig.tight_layout()
plt.show()

# %% [markdown]
# The same over the last tenth of training, per run: a negative `chosen_log_ratio` next to a
# positive `margin` is likelihood displacement (the chosen response became less likely than under
# the reference even though the policy ranks it above the rejected one).

# %%
table = pd.DataFrame(displacement).sort_values(['method', 'beta', 'seed', 'importance'])
for r in displacement:  # the margin is the difference of the two log-ratios, by definition
  np.testing.assert_allclose(r['margin'], r['chosen_log_ratio'] - r['rejected_log_ratio'],
                             rtol=1e-4, atol=1e-4)
table.round(3)

# %% [markdown]
# ## The importance weight during training
#
# The runs with the weight log its batch statistics: the mean weight `is/weight_mean` and the
# effective sample size `is/ess = (sum w)^2 / sum w^2` (the batch size while every weight is 1,
# as at the first step). A mean far below 1 means the policy has made the training pairs much less
# likely than the reference did; Adam normalizes the overall scale of the gradient away, so what
# changes the update is the ESS: a batch whose weight sits on a handful of pairs trains on those
# pairs alone.

# %%
weighted = [key for key in runs if key[1]]
if weighted:
  fig, (ax_w, ax_ess) = plt.subplots(1, 2, figsize=(13, 4.5))
  for index, key in enumerate(weighted):
    metrics = train_rows(key)
    step = np.array([r['step'] for r in metrics])
    label = f'{key[0]} beta {key[2]:g} seed {key[3]}'
    ax_w.plot(step, [r['is/weight_mean'] for r in metrics], color=f'C{index}', label=label)
    ess = np.array([r['is/ess'] for r in metrics])
    ax_ess.plot(step, ess / ess[0], color=f'C{index}', label=label)
  ax_w.set(xlabel='step', ylabel='is/weight_mean', yscale='log', title='mean importance weight')
  ax_ess.set(xlabel='step', ylabel='is/ess / batch size', ylim=(0, 1.05),
             title='effective sample size, as a fraction of the batch')
  ax_w.legend(fontsize='small')
  fig.tight_layout()
  plt.show()

# %% [markdown]
# The same statistics averaged over the last `WINDOW` steps of each run with the weight.

# %%
pd.DataFrame([dict(method=k[0], beta=k[2], seed=k[3],
                   **{name: np.mean([r[name] for r in train_rows(k)[-WINDOW:]])
                      for name in ('is/weight_mean', 'is/ess', 'is/clipped_frac')})
              for k in weighted]).round(3)
