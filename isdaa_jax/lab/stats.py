"""Paired statistics across seeds: with vs without the importance weight on the same seed."""

import math

import numpy as np
from scipy import stats as scipy_stats


def paired_difference(with_weight, without_weight) -> tuple[float, float, int]:
  """Mean of the per-seed differences (with - without), the half-width of its 95% Student-t
  interval (nan with fewer than two seeds), and the number of seeds."""
  diff = np.asarray(with_weight, np.float64) - np.asarray(without_weight, np.float64)
  n = diff.size
  if n < 2:
    return float(diff.mean()) if n else float('nan'), float('nan'), n
  half = scipy_stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)
  return float(diff.mean()), float(half), n


def excludes_zero(mean: float, half_width: float) -> bool:
  """True when the 95% interval mean ± half_width lies entirely on one side of zero."""
  return not math.isnan(half_width) and abs(mean) > half_width
