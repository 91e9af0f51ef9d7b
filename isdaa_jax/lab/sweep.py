"""Many lab runs trained as one vectorized model.

Runs that share what fixes the traced program (the importance options that branch in Python,
`log_ratio` and `self_normalize`, and the model, data and optimizer) are one `Program`, trained in
chunks of equal size so that one compiled step and one compiled evaluation serve every chunk.
Their params, AdamW states and step counters carry a leading run axis R, and one `jax.vmap` of the
real `train.train_step` (layout log-probs, `losses.daa_loss`, the `optimizer.make_optimizer` chain
and schedule) advances all R runs:
- the loss is a per-run choice among the program's loss names (`loss.name_index`), and beta,
  gamma and alpha are per-run traced scalars (the loss only does arithmetic with them);
- every run computes the importance weight; a run without it clips its log-weight to [0, 0], so
  its weight is exactly 1 and its loss, mean(1 * loss), and gradient are the unweighted loss's;
- each run's batch is the real Grain pipeline's batch for its seed (`data.shuffle_seed = seed`):
  with/without pairs of one seed see identical batches from identical reference weights, and the
  evaluations of a step draw samples with the same key (paired comparisons).
`tests/lab_sweep_test.py` checks vectorized runs of several losses against the same runs through
`train.setup`'s jitted step alone.
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
  """Runs of one loss; `config` is the training config they share (its loss.beta and
  loss.importance.enabled are replaced per run), `tags` go into every point they record."""
  config: ml_collections.ConfigDict
  runs: Sequence[Run]
  tags: dict


def program_key(config) -> str:
  """What must be equal for runs to share one compiled program: the config without the loss
  values that are per-run arrays (name, beta, gamma, alpha, the weight's on/off and bounds)."""
  cfg = config.to_dict()
  loss = cfg['loss']
  for k in ('name', 'beta', 'gamma', 'alpha'):
    loss.pop(k)
  for k in ('enabled', 'eps', 'min_log_weight'):
    loss['importance'].pop(k)
  cfg.pop('seed')
  cfg['data'].pop('shuffle_seed')
  return repr(sorted(_flat(cfg)))


def _flat(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def loss_names(groups: Sequence[Group]) -> tuple[str, ...]:
  return tuple(sorted({g.config.loss.name for g in groups}))


def _run_loss(loss_config, names, arrays):
  """`loss_config` choosing among `names` per run, with traced per-run values (not type-checked:
  they are tracers)."""
  loss = ml_collections.ConfigDict(loss_config.to_dict(), type_safe=False)
  loss.name = names[0] if len(names) == 1 else names
  loss.name_index = arrays['name_index']
  loss.beta, loss.gamma, loss.alpha = arrays['beta'], arrays['gamma'], arrays['alpha']
  loss.importance.enabled = True
  loss.importance.eps = arrays['eps']
  loss.importance.min_log_weight = arrays['min_log_weight']
  return loss


def run_arrays(groups: Sequence[Group]) -> dict:
  """Per-run loss values [R] of the groups' runs, in order; a run without the weight gets
  log-weight bounds [0, 0]."""
  names = loss_names(groups)
  out = {k: [] for k in ('name_index', 'beta', 'gamma', 'alpha', 'eps', 'min_log_weight')}
  for g in groups:
    loss = g.config.loss
    for r in g.runs:
      out['name_index'].append(names.index(loss.name))
      out['beta'].append(r.beta)
      out['gamma'].append(loss.gamma)
      out['alpha'].append(loss.alpha)
      out['eps'].append(loss.importance.eps if r.importance else 0.0)
      out['min_log_weight'].append(loss.importance.min_log_weight if r.importance else 0.0)
  return {k: np.array(v, np.int32 if k == 'name_index' else np.float32) for k, v in out.items()}


def vectorized_step(run_setup: train.Setup, names: tuple[str, ...]) -> Callable:
  """jitted (state_R, batch_R, arrays_R) -> (state_R, metrics_R), `arrays_R` from run_arrays."""
  def one(state, batch, arrays):
    cfg = dataclasses.replace(run_setup.step, loss=_run_loss(run_setup.step.loss, names, arrays))
    return train.train_step(state, {}, batch, graphdef=run_setup.graphdef, tx=run_setup.tx,
                            schedule=run_setup.schedule, cfg=cfg)
  return jax.jit(jax.vmap(one), donate_argnums=(0,))


def setup(config) -> train.Setup:
  """The real step's wiring on one device (the runs' axis, not the devices, is the parallelism)."""
  return train.setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_state(tx, params, num_runs: int) -> train.TrainState:
  p_R = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_runs,) + x.shape), params)
  return jax.vmap(functools.partial(train.fresh_state, tx))(p_R)


def init_state(run_setup: train.Setup, params, num_runs: int) -> train.TrainState:
  """R copies of the starting params with fresh optimizer states (compiled once per program)."""
  return _init_state(run_setup.tx, params, num_runs)


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


def chunks(num_runs: int, chunk_size: int) -> list[slice]:
  """`num_runs` split into the fewest chunks of at most `chunk_size`, as equal as possible (the
  last ones are padded up to the first's size, so every chunk has one shape)."""
  n = -(-num_runs // chunk_size)
  size = -(-num_runs // n)
  return [slice(i * size, min((i + 1) * size, num_runs)) for i in range(n)]


def train_program(groups: Sequence[Group], params, batches: dict, evaluator: Evaluator,
                  eval_every: int, epoch_steps: float, chunk_size: int):
  """Trains the runs of `groups` (one program_key) in chunks; returns one point per run and
  evaluation step, and the graphdef and each group's final params [R_group, ...]."""
  cfg = groups[0].config
  run_setup = setup(cfg)
  names = loss_names(groups)
  step_fn = vectorized_step(run_setup, names)
  flat = [(g, r) for g in groups for r in g.runs]
  arrays = run_arrays(groups)
  points, finals = [], []
  parts = chunks(len(flat), chunk_size)
  size = parts[0].stop
  for part in parts:
    idx = np.arange(part.start, part.stop)
    # Padding repeats the chunk's last run; its points and params are dropped.
    idx = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
    chunk_points, params_R = _train_chunk(
        run_setup, step_fn, [flat[i] for i in idx], {k: v[idx] for k, v in arrays.items()},
        params, batches, evaluator, eval_every, epoch_steps, cfg.train.num_steps)
    real = part.stop - part.start
    points += [p for p in chunk_points if p.pop('_slot') < real]
    finals.append(jax.tree.map(lambda x, real=real: x[:real], params_R))
  params_R = jax.tree.map(lambda *xs: jnp.concatenate(xs), *finals)
  out, start = [], 0
  for g in groups:
    out.append(jax.tree.map(lambda x, a=start, b=start + len(g.runs): x[a:b], params_R))
    start += len(g.runs)
  return points, run_setup.graphdef, out


def _train_chunk(run_setup, step_fn, runs, arrays, params, batches, evaluator, eval_every,
                 epoch_steps, num_steps):
  arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
  state = init_state(run_setup, params, len(runs))
  seeds = sorted({r.seed for _, r in runs})
  seed_idx = np.array([seeds.index(r.seed) for _, r in runs])
  run_seeds = np.array([r.seed for _, r in runs])
  points = []

  def record(step, metrics):
    results = evaluator(run_setup.graphdef, state.params, _eval_keys(run_seeds, step))
    host = jax.device_get(metrics) if metrics is not None else None
    for i, ((group, run), res) in enumerate(zip(runs, results)):
      point = dict(group.tags, beta=run.beta, importance=run.importance, seed=run.seed,
                   step=step, epoch=step / epoch_steps, _slot=i, **res)
      if host is not None:
        point.update({k: float(host[k][i]) for k in STEP_METRICS})
        # Mean change of the chosen responses' log-prob from the reference, on the batch.
        point['chosen_logp_change'] = float(host['rewards/chosen'][i]) / run.beta
      points.append(point)

  record(0, None)
  for step in range(1, num_steps + 1):
    per_seed = [batches[s][step - 1] for s in seeds]
    batch = {k: jnp.asarray(np.stack([b[k] for b in per_seed])[seed_idx]) for k in per_seed[0]}
    state, metrics = step_fn(state, batch, arrays)
    if step % eval_every == 0 or step == num_steps:
      record(step, metrics)
  return points, state.params
