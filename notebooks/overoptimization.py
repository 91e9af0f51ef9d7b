# %% [markdown]
# # Reward over-optimization in the lab, with and without the importance weight
#
# The over-optimization lab (`isdaa_jax.lab`) trains each DAA on preference pairs labelled by a
# known gold reward, with and without the IS-DAA importance weight, and records the gold reward
# and the KL to the reference of policy samples as training goes. This notebook reads its
# `results.json` and draws:
#
# 1. the frontier: gold reward against `d = sqrt(KL(policy || reference))` over the whole beta
#    sweep of each method, and gold against the fraction of the epoch trained;
# 2. the with-minus-without gold difference per beta, paired by seed, with its 95% interval;
# 3. AlphaPO's likelihood displacement (the chosen log-prob change) against alpha, 0 = SimPO;
# 4. the importance weight's mean and effective sample size during training, and the ablations
#    of the weight that are not in the paper.
#
# Where the lab ran: `ISDAA_LAB_DIR` (default `runs/lab-quick`, what
# `python -m isdaa_jax.lab --config=configs/lab.py:quick --workdir=runs/lab-quick` writes). When it
# holds no `results.json` the notebook runs the lab there first (the quick config).
# `ISDAA_NOTEBOOK_FAST=1` (the CI test) runs a smoke grid of DPO runs of 4 steps on 2 seeds instead, in a temporary folder unless `ISDAA_LAB_DIR` is set. Built from
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
from isdaa_jax.lab import report
from isdaa_jax.lab import results as lab_results

FAST = os.environ.get('ISDAA_NOTEBOOK_FAST') == '1'
plt.rcParams.update({'figure.dpi': 60 if FAST else 100, 'axes.grid': True, 'grid.alpha': 0.3})

# %% [markdown]
# ## What the full study found (2026-12-07)
#
# `python -m isdaa_jax.lab --config=configs/lab.py --workdir=runs/lab` (365 runs, 7 min 20 s on the
# idle 2-core machine; set `ISDAA_LAB_DIR=runs/lab` to draw it here), 5 seeds paired by seed:
# - the weight changed final gold significantly in 0 of 25 (method, beta) settings, lowered peak
#   gold in 4 (DPO 0.5, hinge 0.5, IPO 0.05 and 0.1) and raised it in none: at low regularization,
#   where the IS-DAA paper places its benefit, it helped in 0 of 5 methods;
# - over-optimization within one epoch is reproduced: without the weight 22 of 25 settings fell by
#   more than 0.03 gold from their peak, which came at 0.74 of the epoch on average;
# - AlphaPO at beta 2.5: the chosen log-prob change is -0.92 at alpha 0 (SimPO), -0.49 at 0.25,
#   -0.35 at 0.5 and -0.30 at 1 (less displacement with larger alpha, as AlphaPO claims);
# - the ablations (token-mean ratio, lower clip, self-normalization; not in the paper) raise the
#   ESS (token mean: 61-64 of 64); only the token-mean ratio changes a verdict, IPO's at its lowest
#   beta and barely (+0.011 ± 0.011 final gold).
#
# The quick mode (the default folder below) is a 30-run subset: the lowest beta, 3 seeds.

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
# One row per (method, variant, importance weight, beta): each statistic is the mean over seeds
# and, with several seeds, the half-width of its 95% interval (`_ci95`). Variant '' is the sweep,
# `alpha=...` the AlphaPO displacement runs, any other name an importance ablation. `drop` is the
# peak-to-final fall of the gold reward (the over-optimization) and `peak_epoch` where the gold
# peaked, as a fraction of one pass over the pairs. The rows are recomputed here from the points
# by `report.summarize`, and must agree with the ones stored in `results.json`.

# %%
rows = report.summarize(points)
np.testing.assert_equal(rows, results['summary'])  # NaNs (single-seed intervals) compare equal
COLUMNS = ['method', 'variant', 'beta', 'importance', 'seeds', 'peak_gold', 'peak_epoch',
           'final_gold', 'drop', 'kl_at_peak', 'final_kl', 'ess', 'fit_a', 'fit_b']
pd.DataFrame(rows)[COLUMNS].round(3)

# %% [markdown]
# ## The frontier: gold reward against sqrt(KL) over the sweep
#
# Each line is one run (one seed), from the reference at the origin outwards; darker lines are
# smaller betas (weaker regularization). Red: without the importance weight; blue: with it. The
# bottom row is the same gold reward against the fraction of the epoch trained: the scaling-laws
# paper (Rafailov et al. 2024) reports over-optimization within a single epoch.

# %%
COLOR = {False: 'tab:red', True: 'tab:blue'}
LABEL = {False: 'without importance weight', True: 'with importance weight'}

runs = collections.defaultdict(list)  # (method, variant, importance, beta, seed) -> points
for p in points:
  runs[report.run_key(p) + (p['seed'],)].append(p)
runs = {key: sorted(pts, key=lambda p: p['step']) for key, pts in sorted(runs.items())}
methods = sorted({p['method'] for p in points if not p['variant']})
betas = {m: sorted({p['beta'] for p in points if p['method'] == m and not p['variant']})
         for m in methods}
sqrt_kl = lambda pts: np.sqrt(np.maximum([p['kl'] for p in pts], 0.0))  # sample KL can dip < 0

for pts in runs.values():
  assert abs(pts[0]['kl']) < 1e-3 and pts[0]['step'] == 0, 'every run starts at the reference'

fig, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 8.5), squeeze=False)
for col, method in enumerate(methods):
  ax_d, ax_epoch = axes[:, col]
  for (m, variant, imp, beta, seed), pts in runs.items():
    if m != method or variant:
      continue
    shade = 0.8 - 0.6 * betas[m].index(beta) / max(len(betas[m]) - 1, 1)
    gold = [p['gold'] for p in pts]
    ax_d.plot(sqrt_kl(pts), gold, color=COLOR[imp], alpha=shade, linewidth=1, marker='.')
    ax_epoch.plot([p['epoch'] for p in pts], gold, color=COLOR[imp], alpha=shade, linewidth=1)
  ax_d.set(title=f'{method} (betas {", ".join(f"{b:g}" for b in betas[method])})',
           xlabel='d = sqrt KL(policy || reference)', ylabel='gold reward')
  ax_epoch.set(xlabel='epoch', ylabel='gold reward')
for imp in (False, True):
  axes[0, 0].plot([], [], color=COLOR[imp], label=LABEL[imp])
axes[0, 0].legend(fontsize='small')
fig.tight_layout()
plt.show()

# %% [markdown]
# ## With minus without, per beta, paired by seed
#
# For each (method, beta), the mean over seeds of the with-minus-without difference of the final
# and the peak gold reward (the two runs of a seed saw the same batches from the same initial
# weights and sampled with the same keys), with its 95% Student-t interval (`lab/stats.py`). The
# verdict counts only intervals that exclude zero.

# %%
comps = report.comparisons(rows)
fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
for ax, method in zip(axes[0], methods):
  cs = sorted((c for c in comps if c['method'] == method), key=lambda c: c['beta'])
  for which, marker in (('final', 'o'), ('peak', 's')):
    ax.errorbar([c['beta'] for c in cs], [c[which][0] for c in cs],
                yerr=[np.nan_to_num(c[which][1]) for c in cs], marker=marker, capsize=3,
                label=f'{which} gold')
  ax.axhline(0.0, color='k', linewidth=0.8)
  ax.set(xscale='log', title=method, xlabel='beta', ylabel='with - without')
axes[0, 0].legend(fontsize='small')
fig.tight_layout()
plt.show()
pd.DataFrame([dict(method=c['method'], beta=c['beta'], final_diff=c['final'][0],
                   final_ci95=c['final'][1], peak_diff=c['peak'][0], peak_ci95=c['peak'][1],
                   seeds=c['final'][2]) for c in comps]).round(3)

# %% [markdown]
# ## AlphaPO's likelihood displacement
#
# A DAA only asks for a wider margin between the chosen and the rejected response; nothing stops
# it from lowering both (Razin et al. 2024, "likelihood displacement"). AlphaPO's alpha reshapes
# the reward to control this. Each evaluation records the mean change of the chosen responses'
# log-prob from the reference on the batch the step trained on (`rewards/chosen / beta`);
# alpha = 0 is SimPO exactly. (Empty in runs without the displacement study, as the quick mode.)

# %%
disp = report.displacement(rows)
if disp:
  fig, (ax_a, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
  for imp in (False, True):
    ds = [d for d in disp if d['importance'] == imp]
    ax_a.errorbar([d['alpha'] for d in ds], [d['change'] for d in ds],
                  yerr=[np.nan_to_num(d['ci95']) for d in ds], marker='o', capsize=3,
                  color=COLOR[imp], label=LABEL[imp])
  for (m, variant, imp, beta, seed), pts in runs.items():
    if variant.startswith('alpha=') and not imp:
      alpha = float(variant[len('alpha='):])
      trained = [p for p in pts if 'chosen_logp_change' in p]
      ax_t.plot([p['epoch'] for p in trained], [p['chosen_logp_change'] for p in trained],
                color=plt.cm.viridis(min(alpha, 1.0)), alpha=0.6,
                label=variant if seed == min(r[4] for r in runs) else None)
  ax_a.axhline(0.0, color='k', linewidth=0.8)
  ax_a.set(xlabel='alpha (0 = SimPO)', ylabel='chosen log-prob change (end of training)')
  ax_t.set(xlabel='epoch', ylabel='chosen log-prob change (without the weight)')
  ax_a.legend(fontsize='small')
  ax_t.legend(fontsize='small')
  fig.tight_layout()
  plt.show()
pd.DataFrame(disp).round(3)

# %% [markdown]
# ## The importance weight during training
#
# The mean weight `is/weight_mean` and the effective sample size `is/ess = (sum w)^2 / sum w^2`
# of the training batch at each evaluation, for the sweep's runs with the weight (without it
# every weight is exactly 1 and the ESS is the batch size). The ablations (not in the paper)
# follow: a per-token-mean log-ratio, a lower clip of the log-weight, and batch
# self-normalization, each against the authors' weight.

# %%
fig, (ax_w, ax_ess) = plt.subplots(1, 2, figsize=(13, 4.5))
for (m, variant, imp, beta, seed), pts in runs.items():
  if imp and not variant:
    trained = [p for p in pts if 'is/ess' in p]
    color = f'C{methods.index(m)}'
    ax_w.plot([p['epoch'] for p in trained], [p['is/weight_mean'] for p in trained],
              color=color, alpha=0.4)
    ax_ess.plot([p['epoch'] for p in trained], [p['is/ess'] for p in trained], color=color,
                alpha=0.4)
for i, m in enumerate(methods):
  ax_w.plot([], [], color=f'C{i}', label=m)
ax_w.set(xlabel='epoch', ylabel='is/weight_mean', yscale='log', title='mean importance weight')
ax_ess.set(xlabel='epoch', ylabel='is/ess', title='effective sample size of the batch')
ax_w.legend(fontsize='small')
fig.tight_layout()
plt.show()
print(report.ablations(rows) or 'no ablations in this run')
