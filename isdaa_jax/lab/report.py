"""The lab's analysis: per-method summaries over seeds, the R(d) fit, report.md and plots.

A point is a dict with method, importance (bool), beta, seed, step, kl, gold (mean gold reward of
policy samples). Over-optimization is read off gold reward against d = sqrt(KL): the gain over
the reference, R(d) = gold(d) - gold(0), is fitted as R(d) = d (a - b log d) (Gao et al. 2023).
"""

import collections
import math
import pathlib

import numpy as np

from isdaa_jax.lab import stats

# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262}


def mean_ci95(values) -> tuple[float, float]:
  """Mean and the half-width of its 95% interval (nan with a single value)."""
  x = np.asarray(values, np.float64)
  if len(x) < 2:
    return float(x.mean()), float('nan')
  return float(x.mean()), _T95.get(len(x) - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(len(x))


def fit_rd(d, gain) -> tuple[float, float]:
  """Least-squares a, b of gain = a d - b d log d over points with d > 0."""
  d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
  keep = d > 1e-8
  if keep.sum() < 2:
    return float('nan'), float('nan')
  d, gain = d[keep], gain[keep]
  design = np.stack([d, -d * np.log(d)], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, gain, rcond=None)
  return float(a), float(b)


def run_key(p) -> tuple:
  return (p['method'], bool(p['importance']), float(p['beta']))


def summarize_run(points) -> dict:
  """Peak and final gold, KL at the peak, and the R(d) fit of one training run."""
  points = sorted(points, key=lambda p: p['step'])
  gold = np.array([p['gold'] for p in points])
  kl = np.maximum(np.array([p['kl'] for p in points]), 0.0)
  peak = int(np.argmax(gold))
  a, b = fit_rd(np.sqrt(kl), gold - gold[0])
  return dict(peak_gold=float(gold[peak]), final_gold=float(gold[-1]), kl_at_peak=float(kl[peak]),
              final_kl=float(kl[-1]), drop=float(gold[peak] - gold[-1]), fit_a=a, fit_b=b)


def summarize(points) -> list[dict]:
  """One row per (method, importance, beta): each statistic's mean and 95% CI over seeds."""
  runs = collections.defaultdict(list)
  for p in points:
    runs[run_key(p) + (p['seed'],)].append(p)
  grouped = collections.defaultdict(list)
  for key, pts in sorted(runs.items()):
    grouped[key[:3]].append((key[3], summarize_run(pts)))
  rows = []
  for (method, importance, beta), seeded in sorted(grouped.items()):
    per_seed = [summary for _, summary in seeded]
    row = dict(method=method, importance=importance, beta=beta, seeds=len(per_seed),
               seed_ids=[seed for seed, _ in seeded],
               per_seed_final_gold=[summary['final_gold'] for summary in per_seed])
    for stat in per_seed[0]:
      row[stat], row[stat + '_ci95'] = mean_ci95([s[stat] for s in per_seed])
    rows.append(row)
  return rows


def _fmt(m, ci):
  return f'{m:.3f}' if math.isnan(ci) else f'{m:.3f} ± {ci:.3f}'


# A peak-to-final gold drop larger than this counts as over-optimization (gold is a mean over
# eval prompts with a standard error of ~0.01-0.02 on the lab's default prompt count).
DROP_THRESHOLD = 0.03


def verdict(rows) -> str:
  """Plain statement, with numbers, of whether importance weighting reduced over-optimization."""
  by_key = {(r['method'], r['beta'], r['importance']): r for r in rows}
  lines, pairs = [], []
  for (method, beta, imp), off in sorted(by_key.items()):
    if imp or (method, beta, True) not in by_key:
      continue
    on = by_key[(method, beta, True)]
    pairs.append((off, on))
    lines.append(
        f'- {method} (beta={beta:g}): final gold {off["final_gold"]:.3f} without -> '
        f'{on["final_gold"]:.3f} with the weight; peak-to-final drop {off["drop"]:.3f} -> '
        f'{on["drop"]:.3f}; final KL {off["final_kl"]:.2f} -> {on["final_kl"]:.2f}.')
  if not pairs:
    return 'No method ran both with and without the importance weight.'
  total = len(pairs)
  # Paired over seeds: a setting counts as better or worse only when the 95% t-interval of the
  # mean per-seed difference (with - without) excludes zero.
  diffs = []
  for off, on in pairs:
    common = sorted(set(off['seed_ids']) & set(on['seed_ids']))
    g_on = [on['per_seed_final_gold'][on['seed_ids'].index(k)] for k in common]
    g_off = [off['per_seed_final_gold'][off['seed_ids'].index(k)] for k in common]
    diffs.append(stats.paired_difference(g_on, g_off))
  sig_better = sum(stats.excludes_zero(m, h) and m > 0 for m, h, _ in diffs)
  sig_worse = sum(stats.excludes_zero(m, h) and m < 0 for m, h, _ in diffs)
  paired = (f'Paired over seeds (95% t-interval of the final-gold difference excluding zero), '
            f'the weight raised final gold in {sig_better} and lowered it in {sig_worse} of '
            f'{total} settings; the rest are not distinguishable from no effect. ')
  lines = [line + (f' Paired final-gold difference {m:+.3f} ± {h:.3f} over {n} seeds.'
                   if not math.isnan(h) else f' Paired difference {m:+.3f} (one seed, no interval).')
           for line, (m, h, n) in zip(lines, diffs)]
  better_final = sum(on['final_gold'] > off['final_gold'] for off, on in pairs)
  lower_kl = sum(on['final_kl'] < off['final_kl'] for off, on in pairs)
  over = [(off, on) for off, on in pairs if off['drop'] > DROP_THRESHOLD]
  head = paired + (f'Means only: with the importance weight the final gold reward was higher in {better_final} of '
          f'{total} (method, beta) settings and the final KL lower in {lower_kl} of {total}. ')
  if not over:
    largest = max(off['drop'] for off, _ in pairs)
    head += (f'Without the weight no run over-optimized within this budget (largest '
             f'peak-to-final gold drop {largest:.3f} <= {DROP_THRESHOLD}), so this run cannot '
             'show whether the weight reduces over-optimization.')
  else:
    reduced = sum(on['drop'] < off['drop'] for off, on in over)
    head += (f'Over-optimization (a peak-to-final gold drop > {DROP_THRESHOLD}) appeared without '
             f'the weight in {len(over)} settings; the weight made that drop smaller in '
             f'{reduced} of them, so on balance it '
             + ('reduced' if reduced * 2 > len(over) else 'did not reduce')
             + ' over-optimization here.')
  return head + '\n\n' + '\n'.join(lines)


def write_report(rows, meta: dict, path: pathlib.Path):
  out = ['# Over-optimization lab report', '']
  out += [f'- {k}: {v}' for k, v in meta.items()]
  out += ['', '## Verdict', '', verdict(rows), '']
  out += ['Gold reward is the task\'s known reward of policy samples (reference level: '
          f'{meta.get("reference_gold", float("nan")):.3f}); KL is the sample estimate of '
          'KL(policy || reference); R(d) = d (a - b log d) is fitted to the gold gain over the '
          'reference against d = sqrt(KL). Values are means ± 95% intervals over seeds.', '']
  for method in sorted({r['method'] for r in rows}):
    out += [f'## {method}', '',
            '| importance | beta | peak gold | final gold | KL at peak | final KL | a | b |',
            '|---|---|---|---|---|---|---|---|']
    for r in rows:
      if r['method'] != method:
        continue
      out.append('| ' + ' | '.join([
          'on' if r['importance'] else 'off', f'{r["beta"]:g}',
          _fmt(r['peak_gold'], r['peak_gold_ci95']), _fmt(r['final_gold'], r['final_gold_ci95']),
          _fmt(r['kl_at_peak'], r['kl_at_peak_ci95']), _fmt(r['final_kl'], r['final_kl_ci95']),
          _fmt(r['fit_a'], r['fit_a_ci95']), _fmt(r['fit_b'], r['fit_b_ci95'])]) + ' |')
    out.append('')
  path.write_text('\n'.join(out))


def plot(points, rows, workdir: pathlib.Path) -> list[pathlib.Path]:
  """gold vs sqrt(KL) per method (with fitted R(d) curves) and gold vs step; returns the PNGs."""
  # Figure objects, not pyplot: no global backend switch, so notebooks that run the study
  # in-process keep their inline plots.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  methods = sorted({p['method'] for p in points})
  runs = collections.defaultdict(list)
  for p in points:
    runs[run_key(p) + (p['seed'],)].append(p)
  ref_gold = np.mean([min(pts, key=lambda p: p['step'])['gold'] for pts in runs.values()])
  paths = []
  for name, x_of, xlabel in (('gold_vs_sqrt_kl.png', lambda p: math.sqrt(max(p['kl'], 0.0)),
                              'sqrt KL(policy || reference)'),
                             ('gold_vs_step.png', lambda p: p['step'], 'step')):
    fig = Figure(figsize=(4.2 * len(methods), 3.6))
    axes = fig.subplots(1, len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods):
      for (m, imp, beta, seed), pts in sorted(runs.items()):
        if m != method:
          continue
        pts = sorted(pts, key=lambda p: p['step'])
        color = 'tab:blue' if imp else 'tab:red'
        ax.plot([x_of(p) for p in pts], [p['gold'] for p in pts], color=color, alpha=0.35,
                lw=1, ls='-' if beta == min(b for (mm, _, b, _) in runs if mm == m) else '--')
      if name.startswith('gold_vs_sqrt'):
        for r in rows:
          if r['method'] == method and not math.isnan(r['fit_a']):
            d = np.linspace(1e-3, max(math.sqrt(max(r['final_kl'], 1e-6)), 1e-2), 100)
            ax.plot(d, ref_gold + d * (r['fit_a'] - r['fit_b'] * np.log(d)),
                    color='tab:blue' if r['importance'] else 'tab:red', lw=2)
      ax.set_title(method)
      ax.set_xlabel(xlabel)
      ax.set_ylabel('gold reward')
    axes[0][0].plot([], [], color='tab:red', label='without importance weight')
    axes[0][0].plot([], [], color='tab:blue', label='with importance weight')
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = workdir / name
    fig.savefig(path, dpi=110)
    paths.append(path)
  return paths
