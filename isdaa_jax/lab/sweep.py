"""Many lab runs trained as one vectorized model.

The runs of a `Group` share what fixes the traced program (the loss name, alpha and the
importance options that branch in Python: `log_ratio`, `self_normalize`) and differ in beta,
seed and whether the weight is on. Their params, AdamW states and step counters carry a leading
run axis R, and one `jax.vmap` of the real `train.train_step` (layout log-probs, `losses.daa_loss`,
the `optimizer.make_optimizer` chain and schedule) advances all R runs in one compiled program:
- beta enters each run's loss config as a traced scalar (the loss only does arithmetic with it);
- every run computes the importance weight; a run without it clips its log-weight to [0, 0], so
  its weight is exactly 1 and its loss, mean(1 * loss), and gradient are the unweighted loss's;
- each run's batch is the real Grain pipeline's batch for its seed (`data.shuffle_seed = seed`):
  with/without pairs of one seed see identical batches from identical reference weights, and the
  evaluations of a step draw samples with the same key (paired comparisons).
`tests/lab_sweep_test.py` checks a vectorized run against the same run through `train.setup`'s
jitted step alone.
"""

import copy
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from isdaa_jax import evaluate, layout as layout_lib, sample, sharding, train
from isdaa_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Run:
  beta: float
  importance: bool
  seed: int


@dataclasses.dataclass
class Group:
  """Runs trained together; `config` is the training config they share (its loss.beta and
  loss.importance.enabled are replaced per run), `tags` go into every point they record."""
  config: ml_collections.ConfigDict
  runs: Sequence[Run]
  tags: dict


def _run_loss(loss_config, beta, eps, min_log_weight):
  """`loss_config` with traced beta and log-weight bounds (not type-checked: they are tracers)."""
  loss = ml_collections.ConfigDict(loss_config.to_dict(), type_safe=False)
  loss.beta = beta
  loss.importance.enabled = True
  loss.importance.eps = eps
  loss.importance.min_log_weight = min_log_weight
  return loss


def run_arrays(group: Group) -> dict:
  """Per-run beta and log-weight bounds [R]; a run without the weight gets bounds [0, 0]."""
  imp = group.config.loss.importance
  on = np.array([r.importance for r in group.runs])
  return dict(beta=np.array([r.beta for r in group.runs], np.float32),
              eps=np.where(on, imp.eps, 0.0).astype(np.float32),
              min_log_weight=np.where(on, imp.min_log_weight, 0.0).astype(np.float32))


def vectorized_step(run_setup: train.Setup) -> Callable:
  """jitted (state_R, batch_R, beta_R, eps_R, min_log_weight_R) -> (state_R, metrics_R)."""
  def one(state, batch, beta, eps, min_log_weight):
    cfg = dataclasses.replace(run_setup.step,
                              loss=_run_loss(run_setup.step.loss, beta, eps, min_log_weight))
    return train.train_step(state, {}, batch, graphdef=run_setup.graphdef, tx=run_setup.tx,
                            schedule=run_setup.schedule, cfg=cfg)
  return jax.jit(jax.vmap(one), donate_argnums=(0,))


def setup(config) -> train.Setup:
  """The real step's wiring on one device (the runs' axis, not the devices, is the parallelism)."""
  return train.setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


def init_state(run_setup: train.Setup, params, num_runs: int) -> train.TrainState:
  """R copies of the starting params with fresh optimizer states."""
  tx = run_setup.tx

  @jax.jit
  def init(p):
    p_R = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_runs,) + x.shape), p)
    return jax.vmap(functools.partial(train.fresh_state, tx))(p_R)
  return init(params)


def seed_batches(config, seeds: Sequence[int], num_steps: int) -> dict:
  """{seed: [num_steps local batches]} from the real pipeline with `data.shuffle_seed = seed`."""
  layout = layout_lib.from_config(config.data)
  data = pipeline.load(config.data, model_path=config.model.path,
                       vocab_size=config.model.vocab_size)
  out = {}
  for seed in seeds:
    data_cfg = copy.deepcopy(config.data)
    data_cfg.shuffle_seed = seed
    it = pipeline.train_iterator(data.train, data_cfg, layout,
                                 micro_batches=config.optimizer.grad_accum_steps, row_multiple=1)
    out[seed] = [next(it) for _ in range(num_steps)]
    it.close()
  return out


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Samples all runs of a group on the eval prompts and scores them like `evaluate.evaluate`."""
  reference: nnx.Module
  prompts: list
  params: sample.SamplingParams
  gold_fn: evaluate.GoldFn
  reference_samples: sample.Samples

  def __call__(self, graphdef, params_R, keys_R) -> list[dict]:
    outs = sample.generate_runs(graphdef, params_R, self.prompts, keys_R, self.params)
    # One reference forward over every run's samples.
    tokens = np.concatenate([o.tokens for o in outs])
    lp_ref = evaluate.response_logps(
        self.reference, self.prompts * len(outs), tokens,
        np.concatenate([o.lengths for o in outs]),
        seq_len=max(map(len, self.prompts)) + tokens.shape[1]).reshape(len(outs), -1)
    return [evaluate.score_samples(o, lp, self.prompts, self.gold_fn,
                                   self.reference_samples).as_dict()
            for o, lp in zip(outs, lp_ref)]


@jax.jit
def _eval_keys(seeds_R, step):
  """Each run's sampling key at `step`: a function of its seed only (paired runs share it)."""
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds_R)


# Train-step metrics recorded with each evaluation (of the batch the step trained on).
STEP_METRICS = ('is/ess', 'is/weight_mean', 'is/clipped_frac', 'rewards/chosen', 'loss')


def train_group(group: Group, params, batches: dict, evaluator: Evaluator, eval_every: int,
                epoch_steps: float) -> tuple[list[dict], nnx.GraphDef, dict]:
  """Trains the group's runs together; returns one point per run and evaluation step, and the
  graphdef and final params [R, ...] of the runs."""
  cfg = group.config
  run_setup = setup(cfg)
  num_steps, runs = cfg.train.num_steps, list(group.runs)
  step_fn = vectorized_step(run_setup)
  arrays = {k: jnp.asarray(v) for k, v in run_arrays(group).items()}
  state = init_state(run_setup, params, len(runs))
  seeds = sorted({r.seed for r in runs})
  seed_idx = np.array([seeds.index(r.seed) for r in runs])
  points = []

  def record(step, metrics):
    keys = _eval_keys(np.array([r.seed for r in runs]), step)
    results = evaluator(run_setup.graphdef, state.params, keys)
    host = jax.device_get(metrics) if metrics is not None else None
    for i, (run, res) in enumerate(zip(runs, results)):
      point = dict(group.tags, beta=run.beta, importance=run.importance, seed=run.seed,
                   step=step, epoch=step / epoch_steps, **res)
      if host is not None:
        point.update({k: float(host[k][i]) for k in STEP_METRICS})
        # Mean change of the chosen responses' log-prob from the reference, on the batch.
        point['chosen_logp_change'] = float(host['rewards/chosen'][i]) / run.beta
      points.append(point)

  record(0, None)
  for step in range(1, num_steps + 1):
    per_seed = [batches[s][step - 1] for s in seeds]
    batch = {k: jnp.asarray(np.stack([b[k] for b in per_seed])[seed_idx]) for k in per_seed[0]}
    state, metrics = step_fn(state, batch, arrays['beta'], arrays['eps'],
                             arrays['min_log_weight'])
    if step % eval_every == 0 or step == num_steps:
      record(step, metrics)
  return points, run_setup.graphdef, state.params
