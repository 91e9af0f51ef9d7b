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
  """(method, variant, importance, beta): variant '' is the sweep proper, else an AlphaPO alpha
  ('alpha=0.5') or an importance ablation ('token_mean', ...)."""
  return (p['method'], p.get('variant', ''), bool(p['importance']), float(p['beta']))


def summarize_run(points) -> dict:
  """Peak and final gold, where the peak fell (epochs), KL, the R(d) fit, ESS and the chosen
  log-prob change of one training run."""
  points = sorted(points, key=lambda p: p['step'])
  gold = np.array([p['gold'] for p in points])
  kl = np.maximum(np.array([p['kl'] for p in points]), 0.0)
  peak = int(np.argmax(gold))
  a, b = fit_rd(np.sqrt(kl), gold - gold[0])
  trained = [p for p in points if 'is/ess' in p]
  return dict(peak_gold=float(gold[peak]), final_gold=float(gold[-1]), kl_at_peak=float(kl[peak]),
              final_kl=float(kl[-1]), drop=float(gold[peak] - gold[-1]),
              peak_epoch=float(points[peak].get('epoch', points[peak]['step'])),
              fit_a=a, fit_b=b,
              ess=float(np.mean([p['is/ess'] for p in trained])) if trained else float('nan'),
              chosen_logp_change=float(trained[-1]['chosen_logp_change']) if trained
              else float('nan'))


def summarize(points) -> list[dict]:
  """One row per run_key: each statistic's mean and 95% CI over seeds, and its per-seed values
  (for paired comparisons)."""
  runs = collections.defaultdict(list)
  for p in points:
    runs[run_key(p) + (p['seed'],)].append(p)
  grouped = collections.defaultdict(list)
  for key, pts in sorted(runs.items()):
    grouped[key[:4]].append((key[4], summarize_run(pts)))
  rows = []
  for (method, variant, importance, beta), seeded in sorted(grouped.items()):
    per_seed = [summary for _, summary in seeded]
    row = dict(method=method, variant=variant, importance=importance, beta=beta,
               seeds=len(per_seed), seed_ids=[seed for seed, _ in seeded])
    for stat in per_seed[0]:
      row[stat], row[stat + '_ci95'] = mean_ci95([s[stat] for s in per_seed])
      row['per_seed_' + stat] = [s[stat] for s in per_seed]
    rows.append(row)
  return rows


def _fmt(m, ci):
  return f'{m:.3f}' if math.isnan(ci) else f'{m:.3f} ± {ci:.3f}'


def paired(on: dict, off: dict, stat: str = 'final_gold') -> tuple[float, float, int]:
  """Mean per-seed difference on - off of `stat` over their common seeds, its 95% half-width."""
  common = sorted(set(on['seed_ids']) & set(off['seed_ids']))
  pick = lambda r: [r['per_seed_' + stat][r['seed_ids'].index(k)] for k in common]
  return stats.paired_difference(pick(on), pick(off))


def comparisons(rows, variant: str = '') -> list[dict]:
  """Per (method, beta): the `variant` weight's runs against the sweep's runs without it."""
  off = {(r['method'], r['beta']): r for r in rows if not r['importance'] and not r['variant']}
  out = []
  for r in rows:
    if r['importance'] and r['variant'] == variant and (r['method'], r['beta']) in off:
      base = off[(r['method'], r['beta'])]
      out.append(dict(method=r['method'], beta=r['beta'], on=r, off=base,
                      final=paired(r, base, 'final_gold'), peak=paired(r, base, 'peak_gold')))
  return out


def _counts(comps, which='final') -> tuple[int, int]:
  better = sum(stats.excludes_zero(*c[which][:2]) and c[which][0] > 0 for c in comps)
  worse = sum(stats.excludes_zero(*c[which][:2]) and c[which][0] < 0 for c in comps)
  return better, worse


# A peak-to-final gold drop larger than this counts as over-optimization (gold is a mean over
# eval prompts with a standard error of ~0.01-0.02 on the lab's default prompt count).
DROP_THRESHOLD = 0.03


def verdict(rows) -> str:
  """Plain statement, with numbers, of whether importance weighting helped, counting only paired
  differences whose 95% interval excludes zero, and where that disagrees with the papers."""
  comps = comparisons(rows)
  if not comps:
    return 'No method ran both with and without the importance weight.'
  total = len(comps)
  better, worse = _counts(comps)
  peak_better, peak_worse = _counts(comps, 'peak')
  over = [c for c in comps if c['off']['drop'] > DROP_THRESHOLD]
  head = [f'Paired by seed (same data order, same initial weights; 95% t-interval of the mean '
          f'with-minus-without difference excluding zero), the importance weight raised the '
          f'final gold reward in {better} and lowered it in {worse} of {total} (method, beta) '
          f'settings, and raised the peak gold in {peak_better} and lowered it in {peak_worse}; '
          'the rest are not distinguishable from no effect.']
  head.append(f'Without the weight {len(over)} of {total} settings over-optimized (gold fell by '
              f'more than {DROP_THRESHOLD} from its peak by the end of the run).')
  # The IS-DAA paper: the weight helps, especially under low regularization (small beta).
  low = [c for c in comps if c['beta'] == min(x['beta'] for x in comps if x['method'] == c['method'])]
  low_better, low_worse = _counts(low)
  if low_better == len(low):
    head.append('At each method\'s lowest beta the weight helped in every method, as the IS-DAA '
                'paper claims.')
  else:
    head.append(f'The lab disagrees with the IS-DAA paper\'s claim that the weight helps '
                f'especially under low regularization: at each method\'s lowest beta it helped '
                f'significantly in {low_better} of {len(low)} methods (hurt in {low_worse}).')
  early = [c['off']['peak_epoch'] for c in comps]
  head.append(f'Without the weight the gold peak came at {np.mean(early):.2f} of an epoch on '
              f'average (range {min(early):.2f}-{max(early):.2f}); the scaling-laws paper reports '
              'over-optimization within one epoch.')
  lines = []
  for c in comps:
    (m, h, n), (pm, ph, _) = c['final'], c['peak']
    sig = ' *' if stats.excludes_zero(m, h) else ''
    lines.append(f'- {c["method"]} (beta={c["beta"]:g}): final gold {c["off"]["final_gold"]:.3f}'
                 f' without -> {c["on"]["final_gold"]:.3f} with the weight, paired difference '
                 f'{m:+.3f} ± {h:.3f}{sig} over {n} seeds (peak {pm:+.3f} ± {ph:.3f}); '
                 f'peak at {c["off"]["peak_epoch"]:.2f} -> {c["on"]["peak_epoch"]:.2f} epoch; '
                 f'final KL {c["off"]["final_kl"]:.2f} -> {c["on"]["final_kl"]:.2f}.')
  return ' '.join(head) + '\n\n' + '\n'.join(lines)


def ablations(rows) -> str:
  """The importance ablations (not in the paper) against the authors' weight: ESS, paired
  differences, and whether the verdict's counts change."""
  variants = sorted({r['variant'] for r in rows if r['variant'] and not r['variant'].startswith(
      'alpha=')})
  if not variants:
    return ''
  out = []
  for variant in variants:
    comps = comparisons(rows, variant)
    method = comps[0]['method']
    authors = [c for c in comparisons(rows) if c['method'] == method]
    b, w = _counts(comps)
    ab, aw = _counts(authors)
    ess = {c['beta']: c['on']['ess'] for c in authors}
    out.append(f'- {variant} (not in the paper), {method}: raised final gold in {b} and lowered '
               f'it in {w} of {len(comps)} betas (the authors\' weight: {ab} and {aw}); the '
               f'verdict for {method} {"does not change" if (b, w) == (ab, aw) else "changes"}.')
    for c in comps:
      m, h, _ = c['final']
      out.append(f'  - beta={c["beta"]:g}: paired final-gold difference {m:+.3f} ± {h:.3f}; '
                 f'mean ESS per batch {c["on"]["ess"]:.1f} (authors\' weight '
                 f'{ess.get(c["beta"], float("nan")):.1f})')
  return '\n'.join(out)


def displacement(rows) -> list[dict]:
  """AlphaPO's chosen log-prob change at the end of training against alpha (0 = SimPO)."""
  out = []
  for r in rows:
    if r['variant'].startswith('alpha='):
      out.append(dict(alpha=float(r['variant'][len('alpha='):]), importance=r['importance'],
                      beta=r['beta'], change=r['chosen_logp_change'],
                      ci95=r['chosen_logp_change_ci95'], final_gold=r['final_gold']))
  return sorted(out, key=lambda d: (d['importance'], d['alpha']))


def write_report(rows, meta: dict, path: pathlib.Path):
  out = ['# Over-optimization lab report', '']
  out += [f'- {k}: {v}' for k, v in meta.items()]
  out += ['', '## Verdict', '', verdict(rows), '']
  abl = ablations(rows)
  if abl:
    out += ['## Importance ablations (not in the paper)', '', abl, '']
  disp = displacement(rows)
  if disp:
    out += ['## AlphaPO likelihood displacement', '',
            'Mean change of the chosen responses\' log-prob from the reference on the last '
            'training batch, against alpha (0 is SimPO exactly).', '',
            '| alpha | importance | beta | chosen log-prob change | final gold |',
            '|---|---|---|---|---|']
    out += [f'| {d["alpha"]:g} | {"on" if d["importance"] else "off"} | {d["beta"]:g} | '
            f'{_fmt(d["change"], d["ci95"])} | {d["final_gold"]:.3f} |' for d in disp]
    out.append('')
  out += ['Gold reward is the task\'s known reward of policy samples (reference level: '
          f'{meta.get("reference_gold", float("nan")):.3f}); KL is the sample estimate of '
          'KL(policy || reference); R(d) = d (a - b log d) is fitted to the gold gain over the '
          'reference against d = sqrt(KL); the peak epoch is where the gold peaked, as a '
          'fraction of one pass over the pairs. Values are means ± 95% intervals over seeds.', '']
  for method in sorted({r['method'] for r in rows}):
    out += [f'## {method}', '',
            '| variant | importance | beta | peak gold | peak epoch | final gold | KL at peak | '
            'final KL | ESS | a | b |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
      if r['method'] != method:
        continue
      out.append('| ' + ' | '.join([
          r['variant'] or 'sweep', 'on' if r['importance'] else 'off', f'{r["beta"]:g}',
          _fmt(r['peak_gold'], r['peak_gold_ci95']), _fmt(r['peak_epoch'], r['peak_epoch_ci95']),
          _fmt(r['final_gold'], r['final_gold_ci95']),
          _fmt(r['kl_at_peak'], r['kl_at_peak_ci95']), _fmt(r['final_kl'], r['final_kl_ci95']),
          f'{r["ess"]:.1f}', _fmt(r['fit_a'], r['fit_a_ci95']),
          _fmt(r['fit_b'], r['fit_b_ci95'])]) + ' |')
    out.append('')
  path.write_text('\n'.join(out))


def plot(points, rows, workdir: pathlib.Path) -> list[pathlib.Path]:
  """The frontier (gold vs sqrt(KL) over the whole sweep, per method), gold vs epoch, the paired
  with-minus-without difference per beta, and AlphaPO's displacement; returns the PNGs."""
  # Figure objects, not pyplot: no global backend switch, so notebooks that run the study
  # in-process keep their inline plots.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  sweep_points = [p for p in points if not p.get('variant')]
  methods = sorted({p['method'] for p in sweep_points})
  runs = collections.defaultdict(list)
  for p in sweep_points:
    runs[run_key(p) + (p['seed'],)].append(p)
  color = lambda imp: 'tab:blue' if imp else 'tab:red'
  paths = []

  def save(fig, name):
    axes = fig.axes
    axes[0].plot([], [], color='tab:red', label='without importance weight')
    axes[0].plot([], [], color='tab:blue', label='with importance weight')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / name, dpi=110)
    paths.append(workdir / name)

  for name, x_of, xlabel in (('gold_vs_sqrt_kl.png', lambda p: math.sqrt(max(p['kl'], 0.0)),
                              'sqrt KL(policy || reference)'),
                             ('gold_vs_step.png', lambda p: p.get('epoch', p['step']),
                              'epoch')):
    fig = Figure(figsize=(4.2 * len(methods), 3.6))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
      betas = sorted({k[3] for k in runs if k[0] == method})
      for (m, _, imp, beta, _), pts in sorted(runs.items()):
        if m == method:
          pts = sorted(pts, key=lambda p: p['step'])
          # Lighter lines for stronger regularization (larger beta).
          ax.plot([x_of(p) for p in pts], [p['gold'] for p in pts], color=color(imp), lw=1,
                  alpha=0.6 - 0.45 * betas.index(beta) / max(len(betas) - 1, 1))
      ax.set_title(f'{method} (betas {", ".join(f"{b:g}" for b in betas)})', fontsize=8)
      ax.set_xlabel(xlabel)
      ax.set_ylabel('gold reward')
    save(fig, name)

  comps = comparisons(rows)
  if comps:
    fig = Figure(figsize=(4.2 * len(methods), 3.2))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
      cs = sorted((c for c in comps if c['method'] == method), key=lambda c: c['beta'])
      for which, marker in (('final', 'o'), ('peak', 's')):
        ax.errorbar([c['beta'] for c in cs], [c[which][0] for c in cs],
                    yerr=[0 if math.isnan(c[which][1]) else c[which][1] for c in cs],
                    marker=marker, capsize=3, label=f'{which} gold')
      ax.axhline(0.0, color='gray', lw=0.8)
      ax.set_xscale('log')
      ax.set_title(method)
      ax.set_xlabel('beta')
      ax.set_ylabel('gold: with - without (95% CI)')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / 'difference_vs_beta.png', dpi=110)
    paths.append(workdir / 'difference_vs_beta.png')

  disp = displacement(rows)
  if disp:
    fig = Figure(figsize=(4.2, 3.4))
    ax = fig.subplots()
    for imp in (False, True):
      ds = [d for d in disp if d['importance'] == imp]
      ax.errorbar([d['alpha'] for d in ds], [d['change'] for d in ds],
                  yerr=[0 if math.isnan(d['ci95']) else d['ci95'] for d in ds], marker='o',
                  capsize=3, color=color(imp))
    ax.axhline(0.0, color='gray', lw=0.8)
    ax.set_xlabel('alpha (0 = SimPO)')
    ax.set_ylabel('chosen log-prob change')
    save(fig, 'alphapo_displacement.png')
  return paths
