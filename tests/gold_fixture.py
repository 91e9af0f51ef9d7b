"""A gold-reward callable for the evaluate CLI test: longer responses score higher."""

import numpy as np


def length_reward(prompts, responses, lengths):
  del prompts, responses
  return np.asarray(lengths, np.float64)
