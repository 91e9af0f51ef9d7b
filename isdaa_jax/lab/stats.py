"""Paired statistics across seeds: with vs without the importance weight on the same seed."""

import math

import numpy as np

# Two-sided 95% Student-t quantiles t(0.975, df) by degrees of freedom (seeds - 1); scipy is not
# a dependency. Beyond the table the normal 1.96 is within 4% for df >= 30.
_T975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 6: 2.44691, 7: 2.36462,
         8: 2.30600, 9: 2.26216, 10: 2.22814, 11: 2.20099, 12: 2.17881, 13: 2.16037, 14: 2.14479,
         15: 2.13145, 19: 2.09302, 24: 2.06390, 29: 2.04523}


def paired_difference(with_weight, without_weight) -> tuple[float, float, int]:
  """Mean of the per-seed differences (with - without), the half-width of its 95% Student-t
  interval (nan with fewer than two seeds), and the number of seeds."""
  diff = np.asarray(with_weight, np.float64) - np.asarray(without_weight, np.float64)
  n = diff.size
  if n < 2:
    return float(diff.mean()) if n else float('nan'), float('nan'), n
  half = _T975.get(n - 1, 1.96 if n > 30 else 2.1) * diff.std(ddof=1) / math.sqrt(n)
  return float(diff.mean()), float(half), n


def excludes_zero(mean: float, half_width: float) -> bool:
  """True when the 95% interval mean ± half_width lies entirely on one side of zero."""
  return not math.isnan(half_width) and abs(mean) > half_width
