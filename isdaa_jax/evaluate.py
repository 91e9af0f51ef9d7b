"""Over-optimization evaluation: sample-based KL to the reference, gold reward, win rate.

KL(pi || pi_ref) is estimated from policy samples y ~ pi(.|x) as the mean of the sequence
log-ratio log pi(y|x) - log pi_ref(y|x): an unbiased estimator whose standard error is reported.
The gold reward is any callable `gold(prompts [B, P] ragged list, responses [B, N], lengths [B])
-> [B]` (the lab's known reward, or `RewardModel.as_gold_fn`).
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isdaa_jax import sample
from isdaa_jax.data import collate
from isdaa_jax.model import logprobs

GoldFn = Callable[[Sequence[Sequence[int]], np.ndarray, np.ndarray], np.ndarray]


def mean_and_stderr(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float('nan')
  return float(x.mean()), se


@jax.jit
def _response_logps(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  hidden = model(batch['chosen_input_ids'], batch['chosen_positions'], batch['chosen_segment_ids'])
  s, _ = logprobs.sequence_logps(hidden, model.unembedding(), batch['chosen_targets'],
                                 batch['chosen_loss_mask'], 0)
  return s


def response_logps(model: nnx.Module, prompts: Sequence[Sequence[int]], responses: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray:
  """Summed log-probs [B] of each response (its first `lengths` tokens) under `model`."""
  pairs = [dict(prompt_ids=p, chosen_ids=r[:n], rejected_ids=r[:n])
           for p, r, n in zip(prompts, np.asarray(responses), np.asarray(lengths))]
  seq_len = max(collate.pair_length(p) for p in pairs)
  batch = collate.collate_pairs(pairs, seq_len)
  batch = {k: v for k, v in batch.items() if k.startswith('chosen_')}
  graphdef, state = nnx.split(model)
  return np.asarray(_response_logps(graphdef, state, batch))


@dataclasses.dataclass
class EvalResult:
  kl: float
  kl_stderr: float
  gold: float
  gold_stderr: float
  length: float
  win_rate: float  # vs reference samples under the gold reward, ties count 1/2 (nan if not run)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def evaluate(policy: nnx.Module, reference: nnx.Module, prompts: Sequence[Sequence[int]],
             key: jax.Array, params: sample.SamplingParams, gold_fn: GoldFn,
             reference_samples: sample.Samples | None = None) -> EvalResult:
  """Samples the policy on `prompts`; KL to the reference, gold reward and win rate.

  `reference_samples` (the reference's own samples on the same prompts) enable the win rate;
  pass them in so that they are drawn once per study, not once per evaluation.
  """
  out = sample.generate(policy, prompts, key, params)
  lp_policy = out.logps.sum(axis=1)
  lp_ref = response_logps(reference, prompts, out.tokens, out.lengths)
  kl, kl_se = mean_and_stderr(lp_policy - lp_ref)
  content = content_lengths(out)
  gold_B = np.asarray(gold_fn(prompts, out.tokens, content))
  gold, gold_se = mean_and_stderr(gold_B)
  win = float('nan')
  if reference_samples is not None:
    ref_gold = np.asarray(gold_fn(prompts, reference_samples.tokens,
                                  content_lengths(reference_samples)))
    win = float(np.mean((gold_B > ref_gold) + 0.5 * (gold_B == ref_gold)))
  return EvalResult(kl=kl, kl_stderr=kl_se, gold=gold, gold_stderr=gold_se,
                    length=float(out.lengths.mean()), win_rate=win)


def content_lengths(samples: sample.Samples) -> np.ndarray:
  """Generated tokens before EOS."""
  return samples.lengths - samples.finished.astype(np.int32)
