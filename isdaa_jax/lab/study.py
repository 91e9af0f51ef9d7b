"""The over-optimization study: reference, preference data, the training grid, the report.

Every training run goes through the real stack (`isdaa_jax.train.run`: Grain pipeline over the
lab's pairs.jsonl, the sharded jitted step, Orbax checkpoints), with a step hook that samples
the policy every `lab.eval_every` steps and records gold reward and KL to the reference.
"""

import copy
import json
import pathlib
import time

import jax
import numpy as np
from absl import logging

from isdaa_jax import evaluate, sample, train
from isdaa_jax.errors import UserError
from isdaa_jax.lab import preferences, reference as reference_lib, report
from isdaa_jax.lab.task import EOS, Task
from isdaa_jax.model import hf
from isdaa_jax.model.llama import LlamaConfig


def run_config(config, method: str, beta: float, importance: bool, seed: int, pairs_path):
  """The training config of one grid point."""
  cfg = copy.deepcopy(config)
  lab = config.lab
  cfg.seed = seed
  cfg.data.path = str(pairs_path)
  cfg.data.shuffle_seed = seed
  cfg.loss.name = method
  cfg.loss.beta = beta
  cfg.loss.importance.enabled = importance
  if method in lab.gamma:
    cfg.loss.gamma = lab.gamma[method]
  if method == 'alphapo':
    cfg.loss.alpha = lab.alpha
  return cfg


def run_name(method: str, beta: float, importance: bool, seed: int) -> str:
  """The folder of one grid point under WORKDIR/runs."""
  return f'{method}-b{beta:g}-is{int(importance)}-s{seed}'


def _eval_hook(task: Task, reference, prompts, reference_samples, params, seed, points, tags):
  def hook(step: int, policy):
    key = jax.random.fold_in(jax.random.key(seed), step)
    res = evaluate.evaluate(policy, reference, prompts, key, params, _gold_fn(task),
                            reference_samples=reference_samples)
    points.append(dict(tags, step=step, **res.as_dict()))
    return {f'lab/{k}': v for k, v in res.as_dict().items()}
  return hook


def _gold_fn(task: Task):
  return lambda prompts, responses, lengths: task.gold_reward(np.asarray(prompts), responses,
                                                              lengths)


def run_study(config, workdir) -> dict:
  """Runs the whole study into `workdir`; returns the summary rows and the verdict."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lab = config.lab
  task = Task.from_config(lab.task)
  if config.model.vocab_size != task.vocab_size:
    raise UserError(f'config.model.vocab_size ({config.model.vocab_size}) must equal the '
                     f"task's vocabulary ({task.vocab_size}); set --config.model.vocab_size")
  started = time.time()

  model_cfg = LlamaConfig.from_model_config(config.model)
  ref_model, sft_nll = reference_lib.train_reference(task, model_cfg, lab.sft, config.seed)
  ref_dir = workdir / 'reference'
  hf.save_model(ref_model, ref_dir)
  logging.info('reference trained: token NLL %.3f', sft_nll)

  rows, pair_summary = preferences.make_pairs(task, ref_model, lab.num_pairs, config.seed + 1)
  pairs_path = workdir / 'pairs.jsonl'
  preferences.write_jsonl(rows, pairs_path)

  rng = np.random.default_rng(config.seed + 2)
  prompts = task.sample_prompts(rng, lab.eval_prompts).tolist()
  params = sample.SamplingParams(max_new_tokens=task.max_response + 1, temperature=1.0,
                                 eos_id=EOS)
  ref_samples = sample.generate(ref_model, prompts, jax.random.key(config.seed + 3), params)

  points = []
  for method in lab.methods:
    for beta in lab.betas[method]:
      for importance in (False, True):
        for seed in lab.seeds:
          tags = dict(method=method, beta=float(beta), importance=importance, seed=seed)
          cfg = run_config(config, method, beta, importance, seed, pairs_path)
          cfg.model.path = str(ref_dir)
          run_dir = workdir / 'runs' / run_name(method, beta, importance, seed)
          hook = _eval_hook(task, ref_model, prompts, ref_samples, params, seed, points, tags)
          train.run(cfg, run_dir, step_hooks=((lab.eval_every, hook),))
          logging.info('lab run %s done (%.0f s elapsed)', run_dir.name, time.time() - started)

  summary_rows = report.summarize(points)
  meta = dict(mode=lab.mode, seconds=round(time.time() - started, 1), sft_token_nll=sft_nll,
              reference_gold=float(np.mean(_gold_fn(task)(
                  prompts, ref_samples.tokens, evaluate.content_lengths(ref_samples)))),
              **{f'pairs_{k}': v for k, v in pair_summary.items()},
              steps=config.train.num_steps, seeds=len(lab.seeds))
  results = dict(meta=meta, points=points, summary=summary_rows,
                 verdict=report.verdict(summary_rows))
  (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  report.write_report(summary_rows, meta, workdir / 'report.md')
  report.plot(points, summary_rows, workdir)
  return results
