"""Paired difference and its 95% t-interval against a hand computation."""

import math

import numpy as np

from isdaa_jax.lab import stats


def test_paired_difference_matches_hand_computation():
  on, off = [1.0, 2.0, 4.0], [0.5, 1.0, 2.5]
  mean, half, n = stats.paired_difference(on, off)
  # differences 0.5, 1.0, 1.5: mean 1, sample sd 0.5, t(0.975, 2) = 4.302653
  assert n == 3
  np.testing.assert_allclose(mean, 1.0)
  np.testing.assert_allclose(half, 4.30265 * 0.5 / math.sqrt(3), rtol=1e-6)
  assert not stats.excludes_zero(mean, half)  # 1 < 1.242
  mean, half, _ = stats.paired_difference([1.0, 1.1, 1.2, 1.05, 0.95], np.zeros(5))
  assert stats.excludes_zero(mean, half)


def test_single_seed_has_no_interval():
  mean, half, n = stats.paired_difference([2.0], [1.5])
  assert (mean, n) == (0.5, 1) and math.isnan(half)
  assert not stats.excludes_zero(mean, half)


def test_verdict_counts_only_intervals_that_exclude_zero():
  from isdaa_jax.lab import report
  points = []
  for seed, (off, on) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.15, 0.52)]):
    for imp, final in ((False, off), (True, on)):
      for step, gold in ((0, 0.0), (10, final)):
        points.append(dict(method='dpo', beta=0.1, importance=imp, seed=seed, step=step,
                           kl=float(step), gold=gold))
  for seed, (off, on) in enumerate([(0.1, 0.5), (0.5, 0.1), (0.3, 0.3)]):
    for imp, final in ((False, off), (True, on)):
      for step, gold in ((0, 0.0), (10, final)):
        points.append(dict(method='ipo', beta=0.5, importance=imp, seed=seed, step=step,
                           kl=float(step), gold=gold))
  text = report.verdict(report.summarize(points))
  assert 'raised the final gold reward in 1 and lowered it in 0 of 2' in text
  assert 'helped significantly in 1 of 2 methods' in text
  np.testing.assert_allclose(  # dpo: differences 0.4, 0.4, 0.37
      stats.paired_difference([0.5, 0.6, 0.52], [0.1, 0.2, 0.15])[0], 0.39)
