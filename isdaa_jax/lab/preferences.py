"""The lab's preference data: reference samples labelled by a Bradley-Terry draw on the gold reward."""

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from isdaa_jax import evaluate, sample
from isdaa_jax.lab.task import EOS, Task


def make_pairs(task: Task, reference: nnx.Module, num_pairs: int, seed: int):
  """Two reference samples per prompt, the gold-preferred one (in a BT draw) as chosen.

  Rows carry the reference's log-probs as `reference_*_logps`, computed by the same full forward
  training uses, so training can run with `train.reference='precomputed'`. Identical sample pairs
  carry no preference and are dropped. Returns (rows, summary).
  """
  rng = np.random.default_rng(seed)
  prompts = task.sample_prompts(rng, num_pairs)
  params = sample.SamplingParams(max_new_tokens=task.max_response + 1, temperature=1.0,
                                 eos_id=EOS)
  key_a, key_b = jax.random.split(jax.random.key(seed))
  a = sample.generate(reference, prompts.tolist(), key_a, params)
  b = sample.generate(reference, prompts.tolist(), key_b, params)
  n_a, n_b = evaluate.content_lengths(a), evaluate.content_lengths(b)
  gold_a = task.gold_reward(prompts, a.tokens, n_a)
  gold_b = task.gold_reward(prompts, b.tokens, n_b)
  a_wins = task.preference_labels(rng, gold_a, gold_b)
  lp_a = evaluate.response_logps(reference, prompts.tolist(), a.tokens, a.lengths)
  lp_b = evaluate.response_logps(reference, prompts.tolist(), b.tokens, b.lengths)

  rows, identical, gold_agree = [], 0, 0
  for i, prompt in enumerate(prompts.tolist()):
    ra, rb = a.tokens[i, :a.lengths[i]].tolist(), b.tokens[i, :b.lengths[i]].tolist()
    if ra == rb:
      identical += 1
      continue
    (rc, lc, gc), (rr, lr, gr) = ((ra, lp_a[i], gold_a[i]), (rb, lp_b[i], gold_b[i]))
    if not a_wins[i]:
      (rc, lc, gc), (rr, lr, gr) = (rr, lr, gr), (rc, lc, gc)
    gold_agree += int(gc > gr)
    rows.append(dict(prompt_ids=prompt, chosen_ids=rc, rejected_ids=rr,
                     reference_chosen_logps=float(lc), reference_rejected_logps=float(lr),
                     gold_chosen=float(gc), gold_rejected=float(gr)))
  summary = dict(pairs=len(rows), dropped_identical=identical,
                 chosen_has_higher_gold=gold_agree / max(len(rows), 1),
                 reference_gold_mean=float(np.mean(np.concatenate([gold_a, gold_b]))))
  return rows, summary


def write_jsonl(rows, path: pathlib.Path):
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
