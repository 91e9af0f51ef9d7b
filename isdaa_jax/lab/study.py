"""The over-optimization study: reference, preference data, the sweep, the report.

Every run goes through the real data pipeline (Grain over the lab's pairs.jsonl, one shuffle per
seed) and the real train step (`train.train_step`, its loss and AdamW chain), many runs at a time
as one vectorized model (`lab/sweep.py`); every `lab.eval_every` steps each run samples the eval
prompts and records gold reward and KL to the reference.
"""

import copy
import json
import pathlib
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from isdaa_jax import evaluate, sample
from isdaa_jax.errors import UserError
from isdaa_jax.lab import preferences, reference as reference_lib, report, sweep
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
  """The folder under WORKDIR/runs holding a sweep run's final policy (Hugging Face format)."""
  return f'{method}-b{beta:g}-is{int(importance)}-s{seed}'


def groups(config, pairs_path) -> list[sweep.Group]:
  """The sweep: each method over its betas, the AlphaPO alphas (0 = SimPO) at one beta, and the
  importance ablations (weight on only; paired with the method's runs without the weight)."""
  lab = config.lab
  seeds = tuple(lab.seeds)
  both = lambda betas: [sweep.Run(float(b), imp, s) for b in betas for imp in (False, True)
                        for s in seeds]
  out = []
  for method in lab.methods:
    cfg = run_config(config, method, lab.betas[method][0], True, seeds[0], pairs_path)
    out.append(sweep.Group(cfg, both(lab.betas[method]), dict(method=method, variant='')))
  for alpha in lab.displacement.alphas:
    cfg = run_config(config, 'alphapo', lab.displacement.beta, True, seeds[0], pairs_path)
    cfg.loss.alpha = float(alpha)
    out.append(sweep.Group(cfg, both((lab.displacement.beta,)),
                           dict(method='alphapo', variant=f'alpha={alpha:g}', alpha=alpha)))
  for name in lab.ablations.order:
    method = lab.ablations.method
    cfg = run_config(config, method, lab.betas[method][0], True, seeds[0], pairs_path)
    cfg.loss.importance.update(lab.ablations[name])
    runs = [sweep.Run(float(b), True, s) for b in lab.betas[method] for s in seeds]
    out.append(sweep.Group(cfg, runs, dict(method=method, variant=name)))
  return out


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
  seconds = {}

  model_cfg = LlamaConfig.from_model_config(config.model)
  ref_model, sft_nll = reference_lib.train_reference(task, model_cfg, lab.sft, config.seed)
  ref_dir = workdir / 'reference'
  hf.save_model(ref_model, ref_dir)
  logging.info('reference trained: token NLL %.3f', sft_nll)
  seconds['reference'] = time.time() - started

  rows, pair_summary = preferences.make_pairs(task, ref_model, lab.num_pairs, config.seed + 1)
  pairs_path = workdir / 'pairs.jsonl'
  preferences.write_jsonl(rows, pairs_path)
  batch_size = config.data.batch_size
  epoch_steps = len(rows) / batch_size
  num_steps = int(lab.epochs * len(rows)) // batch_size
  if num_steps < 1:
    raise UserError(f'{len(rows)} preference pairs make no step of config.data.batch_size='
                    f'{batch_size} at lab.epochs={lab.epochs}; raise lab.num_pairs')

  rng = np.random.default_rng(config.seed + 2)
  prompts = task.sample_prompts(rng, lab.eval_prompts).tolist()
  params = sample.SamplingParams(max_new_tokens=task.max_response + 1, temperature=1.0,
                                 eos_id=EOS)
  ref_samples = sample.generate(ref_model, prompts, jax.random.key(config.seed + 3), params)
  evaluator = sweep.Evaluator(ref_model, prompts, params, _gold_fn(task), ref_samples)
  seconds['pairs'] = time.time() - started - seconds['reference']

  data_cfg = copy.deepcopy(config)
  data_cfg.data.path, data_cfg.model.path = str(pairs_path), str(ref_dir)
  batches = sweep.seed_batches(data_cfg, lab.seeds, num_steps)
  ref_params = nnx.to_pure_dict(nnx.state(ref_model))
  points = []
  programs = {}
  study_groups = groups(config, pairs_path)
  for group in study_groups:
    group.config.model.path = str(ref_dir)
    group.config.train.num_steps = num_steps
    programs.setdefault(sweep.program_key(group.config), []).append(group)
  for program in programs.values():
    program_points, graphdef, params = sweep.train_program(
        program, ref_params, batches, evaluator, lab.eval_every, epoch_steps, lab.chunk_size)
    points += program_points
    for group, params_R in zip(program, params):
      if group.tags['variant']:
        continue
      # The sweep's final policies, for notebooks/loss_surface.py.
      for i, run in enumerate(group.runs):
        hf.save_model(nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], params_R)),
                      workdir / 'runs' / run_name(group.tags['method'], run.beta,
                                                  run.importance, run.seed))
    logging.info('lab program %s (%d runs) done (%.0f s elapsed)',
                 ', '.join(sorted({g.tags['method'] + g.tags['variant'] for g in program})),
                 sum(len(g.runs) for g in program), time.time() - started)
  seconds['sweep'] = time.time() - started - seconds['reference'] - seconds['pairs']

  summary_rows = report.summarize(points)
  meta = dict(mode=lab.mode, seconds=round(time.time() - started, 1),
              seconds_by_phase={k: round(v, 1) for k, v in seconds.items()},
              sft_token_nll=sft_nll,
              reference_gold=float(np.mean(_gold_fn(task)(
                  prompts, ref_samples.tokens, evaluate.content_lengths(ref_samples)))),
              **{f'pairs_{k}': v for k, v in pair_summary.items()},
              steps=num_steps, steps_per_epoch=epoch_steps, seeds=len(lab.seeds),
              runs=sum(len(g.runs) for g in study_groups))
  results = dict(meta=meta, points=points, summary=summary_rows,
                 verdict=report.verdict(summary_rows))
  (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  report.write_report(summary_rows, meta, workdir / 'report.md')
  report.plot(points, summary_rows, workdir)
  return results
