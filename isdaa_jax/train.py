"""The sharded IS-DAA train step and the training loop.

`train_step(state, reference_params, batch) -> (state, metrics)` is pure and jitted once with
explicit in/out shardings and the state donated. Chosen and rejected sequences go through the
policy in one forward pass of batch 2B; the frozen reference (when held at all) runs in the same
step without gradients. Gradient accumulation scans over equal micro-batches and gives the
gradient of the full batch; metrics are computed on the full batch.
"""

import dataclasses
import functools
import itertools
import json
import pathlib
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx

from isdaa_jax import losses, sharding
from isdaa_jax import policy as policy_lib
from isdaa_jax import throughput as throughput_lib
from isdaa_jax.data import packing, prefix
from isdaa_jax.errors import UserError
from isdaa_jax.metrics_writer import MetricsWriter
from isdaa_jax.model import logprobs
from isdaa_jax.optimizer import learning_rate_schedule, make_optimizer
from isdaa_jax.preemption import Preemption


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # pure dict of arrays (nnx.to_pure_dict of the policy)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the jitted step needs to know, fixed at trace time."""
  loss: Any  # config.loss
  reference: str  # config.train.reference
  logprob_chunk_size: int
  grad_accum_steps: int


def sequence_logps(graphdef, params, batch, chunk_size: int):
  """Summed response log-probs and token counts of chosen and rejected, one forward of 2B (or of
  B prefix-shared rows, `config.data.prefix_sharing`, or of the packed rows, `data.packing`)."""
  model = nnx.merge(graphdef, params)
  if packing.KEY in batch:
    return packing.sequence_logps(model, batch, chunk_size)
  if prefix.KEY in batch:
    return prefix.sequence_logps(model, batch, chunk_size)
  cat = lambda key: jnp.concatenate([batch[f'chosen_{key}'], batch[f'rejected_{key}']], axis=0)
  hidden = model(cat('input_ids'), cat('positions'), cat('segment_ids'))
  lp, n = logprobs.sequence_logps(hidden, model.unembedding(), cat('targets'), cat('loss_mask'),
                                  chunk_size)
  b = batch['chosen_input_ids'].shape[0]
  return lp[:b], lp[b:], n[:b], n[b:]


def pair_logps(graphdef, params, reference_params, batch, cfg: StepConfig) -> losses.PairLogps:
  lp_w, lp_l, n_w, n_l = sequence_logps(graphdef, params, batch, cfg.logprob_chunk_size)
  if cfg.reference == 'model':
    rp_w, rp_l, _, _ = sequence_logps(graphdef, jax.lax.stop_gradient(reference_params), batch,
                                      cfg.logprob_chunk_size)
  elif cfg.reference == 'precomputed':
    rp_w, rp_l = batch['reference_chosen_logps'], batch['reference_rejected_logps']
  else:  # reference-free loss without importance weighting
    rp_w, rp_l = jnp.zeros_like(lp_w), jnp.zeros_like(lp_l)
  return losses.PairLogps(
      policy_chosen=lp_w, policy_rejected=lp_l, reference_chosen=rp_w, reference_rejected=rp_l,
      chosen_tokens=n_w, rejected_tokens=n_l,
      behavior_chosen=batch.get('behavior_chosen_logps'),
      behavior_rejected=batch.get('behavior_rejected_logps'))


def _loss_and_logps(params, graphdef, reference_params, batch, cfg: StepConfig):
  logps = pair_logps(graphdef, params, reference_params, batch, cfg)
  return losses.daa_loss(logps, cfg.loss).loss, logps


def _split_micro(batch, n):
  """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, i+2n, ...

  Strided rather than contiguous: the rows of one device stay on that device, so every
  micro-batch is spread over all data-parallel devices and nothing is resharded.
  """
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1),
                      batch)


def _merge_micro(x):
  """Inverse of `_split_micro` for the per-example outputs: [n, B/n, ...] -> [B, ...]."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _real_tokens(batch):
  # Tokens the model ran on, in either layout (unshared: chosen + rejected rows; shared: one row).
  return sum(jnp.sum(v > 0) for k, v in batch.items() if k.endswith('segment_ids'))


def train_step(state: TrainState, reference_params, batch, *, graphdef, tx, schedule,
               cfg: StepConfig):
  grad_fn = jax.value_and_grad(_loss_and_logps, has_aux=True)
  if cfg.grad_accum_steps == 1:
    (_, logps), grads = grad_fn(state.params, graphdef, reference_params, batch, cfg)
  else:
    micro = _split_micro(batch, cfg.grad_accum_steps)

    def body(acc, mb):
      (_, lp), g = grad_fn(state.params, graphdef, reference_params, mb, cfg)
      return jax.tree.map(jnp.add, acc, g), lp

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, logps = jax.lax.scan(body, zeros, micro)
    # Equal micro-batches: the mean of their mean-losses' gradients is the full-batch gradient.
    grads = jax.tree.map(lambda g: g / cfg.grad_accum_steps, grads)
    logps = jax.tree.map(_merge_micro, logps)
  out = losses.daa_loss(logps, cfg.loss)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': out.loss,
      **out.metrics,
      'grad_norm': optax.tree.norm(grads),
      # Checked before every save: a checkpoint never holds non-finite parameters.
      'param_norm': optax.tree.norm(params),
      'learning_rate': schedule(state.step),
      'kl/policy_ref_chosen': jnp.mean(logps.policy_chosen - logps.reference_chosen),
      'tokens': _real_tokens(batch).astype(jnp.float32),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, reference_params, batch, *, graphdef, cfg: StepConfig):
  out = losses.daa_loss(pair_logps(graphdef, params, reference_params, batch, cfg), cfg.loss)
  return {'loss': out.loss, **out.metrics}


@dataclasses.dataclass
class Compiled:
  """The jitted step functions and the shardings they were compiled for."""
  train_step: Callable
  eval_step: Callable
  state_sharding: Any
  reference_sharding: Any
  batch_sharding: Any


def state_shardings(tx, abstract_state: TrainState, params_sharding, mesh) -> TrainState:
  """Optimizer moments follow their parameters' shardings; scalars are replicated."""
  rep = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params_sharding,
                              transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=params_sharding, opt_state=opt)


def compile_steps(graphdef, tx, schedule, cfg: StepConfig, state_sharding, reference_sharding,
                  batch_keys, mesh) -> Compiled:
  bs = sharding.batch_sharding(mesh)
  batch_sharding = {k: bs for k in batch_keys}
  step = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, cfg=cfg),
      in_shardings=(state_sharding, reference_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))
  evaluate = jax.jit(
      functools.partial(eval_step, graphdef=graphdef, cfg=cfg),
      in_shardings=(state_sharding.params, reference_sharding, batch_sharding),
      out_shardings=sharding.replicated(mesh))
  return Compiled(step, evaluate, state_sharding, reference_sharding, batch_sharding)


def init_state(params, tx, state_sharding: TrainState) -> TrainState:
  """A fresh state around already-placed params; the optimizer state is created sharded."""
  @functools.partial(jax.jit, out_shardings=state_sharding)
  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  return init(params)


def describe_nonfinite(metrics: dict) -> Optional[str]:
  bad = [k for k in ('loss', 'grad_norm', 'param_norm') if not np.isfinite(float(metrics[k]))]
  return ', '.join(bad) if bad else None


# ------------------------------------------------------------------------------------------------
# The loop.


class TrainingDiverged(UserError):
  """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


def _to_host(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _evaluate(compiled, params, reference, eval_batches, mesh, max_batches: int) -> dict:
  totals, count = {}, 0
  batches = eval_batches()
  for batch in itertools.islice(batches, max_batches):
    m = _to_host(compiled.eval_step(params, reference, sharding.global_batch(batch, mesh)))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + v
    count += 1
  if hasattr(batches, 'close'):  # a Grain iterator: stop its worker processes now
    batches.close()
  return {f'eval/{k}': v / count for k, v in totals.items()} if count else {}


def run(config, workdir, step_hooks=()) -> TrainState:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the state.

  `step_hooks`: (every, fn) pairs; fn(step, policy: nnx.Module) -> dict of scalars is called at
  step 0, every `every` steps and at the last step, and its scalars are logged (used by the lab
  for gold-reward / KL curves from one run).
  """
  from isdaa_jax import checkpoint, distributed  # pylint: disable=g-import-not-at-top
  from isdaa_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  distributed.initialize(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  num_steps = config.train.num_steps

  model_cfg, graphdef, params_sharding, params = policy_lib.build_policy(config.model, mesh,
                                                                        config.seed)
  reference = policy_lib.build_reference(config, mesh, params, params_sharding)
  reference_sharding = params_sharding if reference else {}
  # Generation-based eval measures KL to the reference model, or to the starting policy when no
  # reference model is held.
  kl_reference = reference
  if config.sample_eval.every and not reference:
    kl_reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_sharding)(
        params)
  tx = make_optimizer(config.optimizer, num_steps)
  schedule = learning_rate_schedule(config.optimizer, num_steps)
  abstract_state = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
      params)
  state_sharding = state_shardings(tx, abstract_state, params_sharding, mesh)

  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if config.data.batch_size % data_parallel:
    raise UserError(f'config.data.batch_size={config.data.batch_size} must be divisible by the '
                     f'data-parallel mesh size data*fsdp={data_parallel}')
  data = pipeline.load(config.data, model_path=config.model.path,
                       vocab_size=model_cfg.vocab_size)
  if config.train.reference == 'cached':
    splits = {'train': data.train, **({} if data.eval is None else {'eval': data.eval})}
    policy_lib.attach_cached_reference(config, workdir, mesh, splits, graphdef, params)
  train_iterator = pipeline.train_iterator(data.train, config.data,
                                           micro_batches=config.optimizer.grad_accum_steps,
                                           row_multiple=data_parallel)

  def eval_batches():
    return iter(()) if data.eval is None else pipeline.eval_iterator(
        data.eval, config.data, row_multiple=data_parallel)

  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint, has_data_state=True)
  sharded_abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_sharding)
  state = checkpointer.restore_latest(sharded_abstract, train_iterator)
  if state is None:
    state = init_state(params, tx, state_sharding)
  else:
    logging.info('resumed from step %d', int(state.step))
  del params

  # A cached reference is a precomputed one by the time the step runs.
  step_reference = 'precomputed' if config.train.reference == 'cached' else config.train.reference
  cfg = StepConfig(loss=config.loss, reference=step_reference,
                   logprob_chunk_size=config.model.logprob_chunk_size,
                   grad_accum_steps=config.optimizer.grad_accum_steps)
  compiled = None  # compiled at the first batch, whose keys fix the batch shardings
  if config.sample_eval.every:
    from isdaa_jax import evaluate  # pylint: disable=g-import-not-at-top
    step_hooks = tuple(step_hooks) + (evaluate.training_hook(
        config.sample_eval, config.model, graphdef, kl_reference, mesh),)
  writer = MetricsWriter(workdir, config.train.tensorboard)
  peak = config.train.peak_flops_per_device or throughput_lib.measure_peak_flops()
  throughput = throughput_lib.Throughput(
      throughput_lib.flops_per_token(model_cfg.num_params(), config.train.reference),
      peak * jax.device_count())
  config_json = json.loads(config.to_json())
  preemption = Preemption()
  start = int(state.step)
  writer.drop_after(start)  # rows past the restored checkpoint are logged again
  bar = tqdm.tqdm(total=num_steps, initial=start, disable=not config.train.progress_bar
                  or jax.process_index() != 0, desc='train')

  def run_hooks(step):
    scalars = {}
    for every, fn in step_hooks:
      if step % every == 0 or step == num_steps:
        scalars.update(fn(step, nnx.merge(graphdef, state.params)))
    if scalars:
      writer.write(step, scalars, tensorboard=True)

  def log(step, device_metrics):
    """Pulls a step's metrics (waiting for the step to finish), checks and writes them."""
    nonlocal clock, last_good_step
    metrics = _to_host(device_metrics)
    now = time.perf_counter()
    if step > start + 1:  # a run's first step includes compilation
      throughput.add(metrics['tokens'], now - clock)
    clock = now
    bad = describe_nonfinite(metrics)
    if bad:
      kept = (f'the last good checkpoint (step {last_good_step}) in {checkpointer.directory} '
              'is intact and a rerun resumes from it' if last_good_step
              else 'no checkpoint had been written yet')
      raise TrainingDiverged(f'{bad} became non-finite at step {step}; {kept}; lower '
                             'config.optimizer.learning_rate or check the data')
    report = step % config.train.log_every == 0 or step == num_steps
    if report:
      metrics.update(throughput.report())
    writer.write(step, metrics, tensorboard=report)
    bar.set_postfix(loss=f'{metrics["loss"]:.4f}', refresh=False)

  if start == 0:
    run_hooks(0)
  last_good_step = start
  pending = None  # (step, device metrics) of the step before, pulled one step late
  clock = time.perf_counter()  # when the newest pulled step was seen finished
  try:
    for step in range(start + 1, num_steps + 1):
      try:
        local = next(train_iterator)
      except StopIteration:
        logging.warning('the training data ran out after step %d (config.data.num_epochs=%d)',
                        step - 1, config.data.num_epochs)
        break
      if compiled is None:
        compiled = compile_steps(graphdef, tx, schedule, cfg, state_sharding, reference_sharding,
                                 tuple(local), mesh)
      state, metrics = compiled.train_step(state, reference,
                                           sharding.global_batch(local, mesh))
      if pending is not None:
        log(*pending)
      pending = (step, metrics)
      bar.update(1)
      save_now = (step % config.checkpoint.every_steps == 0 or step == num_steps
                  or preemption.reached(step))
      evaluate_now = config.train.eval_every and step % config.train.eval_every == 0
      hook_now = any(step % every == 0 or step == num_steps for every, _ in step_hooks)
      if save_now or evaluate_now or hook_now:
        # Synchronize: this step's metrics are checked before anything is saved or evaluated.
        log(step, metrics)
        pending = None
        eval_loss = None
        if evaluate_now:
          scalars = _evaluate(compiled, state.params, reference, eval_batches, mesh,
                              config.train.eval_batches)
          writer.write(step, scalars)
          eval_loss = scalars.get('eval/loss')
        run_hooks(step)
        if save_now or preemption.raised:
          checkpointer.save(step, state, train_iterator, config_json, eval_loss=eval_loss,
                            force=True)
          last_good_step = step
        if preemption.raised:
          break
        clock = time.perf_counter()  # evaluation, hooks and saving are not step time
    if pending is not None:
      log(*pending)
  finally:
    checkpointer.wait()
    # Worker processes and their shared-memory buffers go now, not at interpreter exit.
    train_iterator.close()
    preemption.restore()
    bar.close()
    writer.close()
  if config.checkpoint.export_hf and not preemption.raised:  # every process joins the gathers
    from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
    hf.save_model(nnx.merge(graphdef, state.params), workdir / 'hf')
  checkpointer.close()
  return state
