"""The sharded IS-DAA train step and the training loop.

`train_step(state, reference_params, batch) -> (state, metrics)` is pure and jitted once with
explicit in/out shardings and the state donated. Chosen and rejected sequences go through the
policy in one forward pass of batch 2B; the frozen reference (when held at all) runs in the same
step without gradients. With LoRA (`config.model.lora.rank > 0`) the state's params are the
adapters alone, the step's frozen argument is the base (bfloat16 if asked), and the reference is
that base with the adapters off: no reference copy exists. Gradient accumulation scans over equal micro-batches and gives the
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
from jax.sharding import Mesh, NamedSharding

from isdaa_jax import layout as layout_lib
from isdaa_jax import losses, run_files, sharding
from isdaa_jax import policy as policy_lib
from isdaa_jax import reference as reference_lib
from isdaa_jax import throughput as throughput_lib
from isdaa_jax.errors import UserError
from isdaa_jax.metrics_writer import MetricsWriter
from isdaa_jax.model import lora as lora_lib
from isdaa_jax.model.llama import LlamaConfig
from isdaa_jax.optimizer import learning_rate_schedule, make_optimizer
from isdaa_jax.preemption import Preemption


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # pure dict of arrays (nnx.to_pure_dict of the policy; its adapters with LoRA)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the jitted step needs to know, fixed at trace time."""
  loss: Any  # config.loss
  layout: layout_lib.Layout  # how batches are laid out (config.data)
  reference: str  # a reference.STEP_MODES entry ('cached' arrives as 'precomputed')
  logprob_chunk_size: int
  grad_accum_steps: int
  lora: bool = False  # params are adapters over the frozen base given as the frozen argument

  @classmethod
  def from_config(cls, config) -> 'StepConfig':
    return cls(loss=config.loss, layout=layout_lib.from_config(config.data),
               reference=reference_lib.step_mode(config.train.reference),
               logprob_chunk_size=config.model.logprob_chunk_size,
               grad_accum_steps=config.optimizer.grad_accum_steps,
               lora=config.model.lora.rank > 0)


def sequence_logps(graphdef, params, batch, cfg: StepConfig):
  """Summed response log-probs and token counts of chosen and rejected under `params`."""
  return cfg.layout.sequence_logps(nnx.merge(graphdef, params), batch, cfg.logprob_chunk_size)


def pair_logps(graphdef, params, reference_params, batch, cfg: StepConfig,
               base_graphdef=None) -> losses.PairLogps:
  """`reference_params`: the frozen argument of the step (with LoRA the base, whose model
  `base_graphdef` is also the reference; else the reference model's params or {})."""
  policy = lora_lib.combine(reference_params, params) if cfg.lora else params
  lp_w, lp_l, n_w, n_l = sequence_logps(graphdef, policy, batch, cfg)
  rp_w, rp_l = reference_lib.step_logps(cfg.reference, cfg.layout,
                                        graphdef if base_graphdef is None else base_graphdef,
                                        reference_params, batch, cfg.logprob_chunk_size, lp_w,
                                        lp_l)
  return losses.PairLogps(
      policy_chosen=lp_w, policy_rejected=lp_l, reference_chosen=rp_w, reference_rejected=rp_l,
      chosen_tokens=n_w, rejected_tokens=n_l,
      behavior_chosen=batch.get('behavior_chosen_logps'),
      behavior_rejected=batch.get('behavior_rejected_logps'))


def _loss_and_logps(params, graphdef, reference_params, batch, cfg: StepConfig, base_graphdef):
  logps = pair_logps(graphdef, params, reference_params, batch, cfg, base_graphdef)
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


def train_step(state: TrainState, reference_params, batch, *, graphdef, tx, schedule,
               cfg: StepConfig, base_graphdef=None):
  grad_fn = jax.value_and_grad(_loss_and_logps, has_aux=True)
  if cfg.grad_accum_steps == 1:
    (_, logps), grads = grad_fn(state.params, graphdef, reference_params, batch, cfg,
                                base_graphdef)
  else:
    micro = _split_micro(batch, cfg.grad_accum_steps)

    def body(acc, mb):
      (_, lp), g = grad_fn(state.params, graphdef, reference_params, mb, cfg, base_graphdef)
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
      'tokens': cfg.layout.real_tokens(batch).astype(jnp.float32),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, reference_params, batch, *, graphdef, cfg: StepConfig, base_graphdef=None):
  out = losses.daa_loss(pair_logps(graphdef, params, reference_params, batch, cfg,
                                   base_graphdef), cfg.loss)
  return {'loss': out.loss, **out.metrics}


@dataclasses.dataclass
class Setup:
  """The wiring of one training run, from the config alone: no weights and no data are read
  (with `model.path`, only its config.json). `train.run`, the tests, the benchmarks and the
  notebooks all build their step here."""
  mesh: Mesh
  model_cfg: LlamaConfig
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: Callable
  step: StepConfig
  params_sharding: Any  # pure dict of NamedShardings of the trained params (LoRA: adapters)
  # Of the step's frozen argument: params_sharding when the reference runs in the step, else {};
  # with LoRA always the base's.
  reference_sharding: Any
  state_sharding: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs that carry `state_sharding`
  batch_sharding: NamedSharding  # of every batch leaf: rows over the data-parallel axes
  train_step: Callable  # jitted (state, reference_params, batch) -> (state, metrics), donating state
  eval_step: Callable  # jitted (params, reference_params, batch) -> metrics
  # The model of the frozen base (LoRA: the adapted model without adapters; else `graphdef`) and
  # its params' shardings (else `params_sharding`).
  base_graphdef: Any = None
  base_sharding: Any = None
  # The step's frozen argument as ShapeDtypeStructs carrying `reference_sharding` (the in-step
  # reference or the LoRA base; {} when there is none): what the planner compiles against.
  abstract_frozen: Any = None

  def policy_params(self, params, frozen) -> dict:
    """The full policy's pure dict (for `graphdef`) from the trained params and frozen arg."""
    return lora_lib.combine(frozen, params) if self.step.lora else params

  @property
  def data_parallel(self) -> int:
    return self.mesh.shape['data'] * self.mesh.shape['fsdp']

  def init_state(self, params) -> TrainState:
    """A fresh state around already-placed params; the optimizer state is created sharded."""
    return jax.jit(functools.partial(fresh_state, self.tx),
                   out_shardings=self.state_sharding)(params)


def fresh_state(tx, params) -> TrainState:
  """Step 0 around `params` with `tx`'s initial optimizer state (traceable: eval_shape, vmap)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(tx, abstract_state: TrainState, params_sharding, mesh) -> TrainState:
  """Optimizer moments follow their parameters' shardings; scalars are replicated."""
  rep = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params_sharding,
                              transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=params_sharding, opt_state=opt)


def _under_mesh(mesh, fn):
  """`fn` traced with `mesh` as the abstract mesh in context, so the model's activation
  constraints (`llama.rows_over_data`) know the data-parallel axes."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def setup(config, mesh) -> Setup:
  """Optimizer, schedule, shardings, abstract state, step config and the jitted steps."""
  if config.data.batch_size % (mesh.shape['data'] * mesh.shape['fsdp']):
    raise UserError(f'config.data.batch_size={config.data.batch_size} must be divisible by the '
                    f'data-parallel mesh size data*fsdp={mesh.shape["data"] * mesh.shape["fsdp"]}')
  if config.model.lora.rank:
    (model_cfg, graphdef, base_graphdef, base_sharding, abstract_base, params_sharding,
     abstract_params) = policy_lib.abstract_lora_policy(config.model, mesh, config.seed)
  else:
    model_cfg, graphdef, params_sharding, abstract_params = policy_lib.abstract_policy(
        config.model, mesh, config.seed)
    base_graphdef, base_sharding, abstract_base = graphdef, params_sharding, abstract_params
  num_steps = config.train.num_steps
  tx = make_optimizer(config.optimizer, num_steps)
  schedule = learning_rate_schedule(config.optimizer, num_steps)
  abstract = jax.eval_shape(functools.partial(fresh_state, tx), abstract_params)
  state_sharding = state_shardings(tx, abstract, params_sharding, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, state_sharding)
  cfg = StepConfig.from_config(config)
  if cfg.lora or reference_lib.in_step(cfg.reference):
    reference_sharding = base_sharding
    abstract_frozen = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_base,
        base_sharding)
  else:
    reference_sharding, abstract_frozen = {}, {}
  graphdefs = dict(graphdef=graphdef, base_graphdef=base_graphdef)
  batch_sharding = sharding.batch_sharding(mesh)
  step = jax.jit(
      _under_mesh(mesh, functools.partial(train_step, tx=tx, schedule=schedule, cfg=cfg,
                                          **graphdefs)),
      in_shardings=(state_sharding, reference_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))
  evaluate = jax.jit(
      _under_mesh(mesh, functools.partial(eval_step, cfg=cfg, **graphdefs)),
      in_shardings=(params_sharding, reference_sharding, batch_sharding),
      out_shardings=sharding.replicated(mesh))
  return Setup(mesh=mesh, model_cfg=model_cfg, graphdef=graphdef, tx=tx, schedule=schedule,
               step=cfg, params_sharding=params_sharding, reference_sharding=reference_sharding,
               state_sharding=state_sharding, abstract_state=abstract_state,
               batch_sharding=batch_sharding, train_step=step, eval_step=evaluate,
               base_graphdef=base_graphdef, base_sharding=base_sharding,
               abstract_frozen=abstract_frozen)


def load_start(config, run_setup: Setup):
  """(trainable params, the step's frozen argument, the full starting model's params).

  Without LoRA: the policy, the reference `reference_lib.build` gives for the mode, the policy.
  With LoRA: the adapters (zero B), the frozen base (which is also the reference, adapters off,
  and is never donated: no copy), the base.
  """
  mesh = run_setup.mesh
  if run_setup.step.lora:
    base = policy_lib.load_params(policy_lib.base_model_config(config.model), mesh, config.seed,
                                  run_setup.base_sharding)
    adapters = policy_lib.load_adapters(config.model, run_setup.model_cfg, mesh, config.seed,
                                        run_setup.params_sharding)
    return adapters, base, base
  params = policy_lib.load_params(config.model, mesh, config.seed, run_setup.params_sharding)
  return params, reference_lib.build(config, mesh, params, run_setup.params_sharding), params


def export(run_setup: Setup, params, frozen, workdir, base_name: str = '', tokenizer: str = ''):
  """The policy as a Hugging Face folder WORKDIR/hf, with `tokenizer`'s files, chat template and
  bos/eos/pad ids when one is named (a GGUF's too); with LoRA the adapters merged into the base
  there, and the adapter alone in PEFT format in WORKDIR/adapter."""
  from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(workdir) / 'hf'
  tok = _export_tokenizer(tokenizer, out) if tokenizer else None
  ids = {} if tok is None else hf.token_id_fields(tok)
  if not run_setup.step.lora:
    hf.save_model(nnx.merge(run_setup.graphdef, params), out, extra_config=ids)
    return
  from isdaa_jax.model import peft  # pylint: disable=g-import-not-at-top
  spec = run_setup.model_cfg.lora
  merged = jax.jit(lambda b, a: lora_lib.merge_into_base(b, a, spec),
                   out_shardings=run_setup.base_sharding)(frozen, params)
  hf.save_model(nnx.merge(run_setup.base_graphdef, merged), out, extra_config=ids)
  peft.save_adapter(params, run_setup.model_cfg, out.parent / 'adapter', base_name=base_name)


def _export_tokenizer(name: str, out_dir: pathlib.Path):
  """The run's tokenizer, saved beside the exported weights by process 0, or None: one that
  cannot be read now (it was read at start-up) costs a warning, never the trained weights."""
  from isdaa_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  try:
    tok = tokenize.load_tokenizer(name)
  except tokenize.TokenizerError as e:
    logging.warning('the export in %s has no tokenizer files: %s', out_dir, e)
    return None
  if jax.process_index() == 0:
    tok.save_pretrained(str(out_dir))
  return tok


def describe_nonfinite(metrics: dict) -> Optional[str]:
  bad = [k for k in ('loss', 'grad_norm', 'param_norm') if not np.isfinite(float(metrics[k]))]
  return ', '.join(bad) if bad else None


def describe_norm_blowup(param_norm: float, start_norm: float, max_ratio: float) -> Optional[str]:
  """Why `param_norm` counts as diverged against the starting norm, or None (0/inf = off).

  Finite but huge weights (a learning rate far too high) would otherwise train on, be saved as
  the last good checkpoint, and diverge again from there.
  """
  if not 0 < max_ratio < np.inf or start_norm <= 0 or param_norm <= max_ratio * start_norm:
    return None
  return (f'param_norm grew to {param_norm:.3g}, {param_norm / start_norm:.3g} times its '
          f'starting {start_norm:.3g} (over config.train.max_param_norm_ratio={max_ratio:g})')


# ------------------------------------------------------------------------------------------------
# The loop.


class TrainingDiverged(UserError):
  """The loss, gradient or parameters became NaN/Inf, or the parameter norm blew up; the last
  good checkpoint is kept."""


def _to_host(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _evaluate(run_setup: Setup, params, reference, batches, max_batches: int) -> dict:
  totals, count = {}, 0
  for batch in itertools.islice(batches, max_batches):
    m = _to_host(run_setup.eval_step(params, reference,
                                     sharding.global_batch(batch, run_setup.mesh)))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + v
    count += 1
  if hasattr(batches, 'close'):  # a Grain iterator: stop its worker processes now
    batches.close()
  return {f'eval/{k}': v / count for k, v in totals.items()} if count else {}


class _StepLog:
  """Pulls each step's metrics (one step late), checks them, times the window and writes them."""

  def __init__(self, config, writer, throughput, checkpointer, start: int, start_norm: float):
    self._config, self._writer, self._throughput = config, writer, throughput
    self._checkpointer, self._start, self._start_norm = checkpointer, start, start_norm
    self.last_good_step = start
    self.clock = time.perf_counter()  # when the newest pulled step was seen finished

  def __call__(self, step: int, device_metrics, bar):
    metrics = _to_host(device_metrics)
    now = time.perf_counter()
    if step > self._start + 1:  # a run's first step includes compilation
      self._throughput.add(metrics['tokens'], now - self.clock)
    self.clock = now
    bad = describe_nonfinite(metrics)
    bad = f'{bad} became non-finite' if bad else describe_norm_blowup(
        metrics['param_norm'], self._start_norm, self._config.train.max_param_norm_ratio)
    if bad:
      kept = (f'the last good checkpoint (step {self.last_good_step}) in '
              f'{self._checkpointer.directory} is intact and a rerun resumes from it'
              if self.last_good_step else 'no checkpoint had been written yet')
      raise TrainingDiverged(f'{bad} at step {step}; {kept}; lower '
                             'config.optimizer.learning_rate or check the data')
    num_steps = self._config.train.num_steps
    report = step % self._config.train.log_every == 0 or step == num_steps
    if report:
      metrics.update(self._throughput.report())
    self._writer.write(step, metrics, tensorboard=report)
    bar.set_postfix(loss=f'{metrics["loss"]:.4f}', refresh=False)


def run(config, workdir, step_hooks=()) -> TrainState:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the state.

  `step_hooks`: (every, fn) pairs; fn(step, policy: nnx.Module) -> dict of scalars is called at
  step 0, every `every` steps and at the last step, and its scalars are logged (used by the lab
  for gold-reward / KL curves from one run).
  """
  from isdaa_jax import checkpoint, config as config_lib, distributed  # pylint: disable=g-import-not-at-top
  from isdaa_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  distributed.initialize(config.distributed)
  run_setup = setup(config, sharding.make_mesh(config.mesh))
  mesh, graphdef, num_steps = run_setup.mesh, run_setup.graphdef, config.train.num_steps
  lora = run_setup.step.lora
  params, reference, base_params = load_start(config, run_setup)
  base_fingerprint = lora_lib.fingerprint(base_params) if lora else None
  data = pipeline.load(config.data, model_path=config.model.path,
                       vocab_size=run_setup.model_cfg.vocab_size)
  if jax.process_index() == 0:
    print('\n'.join(pipeline.describe(data.summary)), flush=True)
  splits = {'train': data.train, **({} if data.eval is None else {'eval': data.eval})}
  if config.train.reference == 'cached':
    splits = reference_lib.attach_cached(config, workdir, mesh, splits, run_setup.base_graphdef,
                                         base_params)
  layout, dp = run_setup.step.layout, run_setup.data_parallel
  train_iterator = pipeline.train_iterator(splits['train'], config.data, layout,
                                           micro_batches=config.optimizer.grad_accum_steps,
                                           row_multiple=dp)
  eval_batches = lambda: pipeline.eval_iterator(splits['eval'], config.data, layout,
                                                row_multiple=dp)
  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint, has_data_state=True,
                                         base_fingerprint=base_fingerprint)
  state = checkpointer.restore_latest(run_setup.abstract_state, train_iterator)
  # The norm blow-up check compares against the starting weights, also on resume.
  start_norm = float(optax.tree.norm(params))
  if state is None:
    state = run_setup.init_state(params)
  else:
    logging.info('resumed from step %d', int(state.step))
    blowup = describe_norm_blowup(float(optax.tree.norm(state.params)), start_norm,
                                  config.train.max_param_norm_ratio)
    if blowup:
      raise TrainingDiverged(
          f'the checkpoint at step {int(state.step)} in {checkpointer.directory} already '
          f'diverged: {blowup}; move it out of the folder to resume from an earlier one, or use '
          'a new --workdir')
  # The run is accepted: what it trains under and on is recorded only now.
  config_json = json.loads(config.to_json())
  run_files.write_config(workdir, config_json)
  run_files.write_data_summary(workdir, data.summary)
  if config.sample_eval.every:
    from isdaa_jax import evaluate  # pylint: disable=g-import-not-at-top
    # KL is measured to the reference model, or to the starting policy when none is held.
    # With LoRA that is the base (adapters off).
    kl_reference = reference or jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                        out_shardings=run_setup.params_sharding)(params)
    step_hooks = tuple(step_hooks) + (evaluate.training_hook(
        config.sample_eval, config.model, run_setup.base_graphdef, kl_reference, mesh),)
  del params, base_params
  writer = MetricsWriter(workdir, config.train.tensorboard)
  peak = config.train.peak_flops_per_device or throughput_lib.measure_peak_flops()
  throughput = throughput_lib.Throughput(throughput_lib.flops_per_token(
      run_setup.model_cfg.num_params(), config.train.reference, lora=run_setup.step.lora),
      peak * jax.device_count())
  preemption = Preemption()
  start = int(state.step)
  writer.drop_after(start)  # rows past the restored checkpoint are logged again
  bar = tqdm.tqdm(total=num_steps, initial=start, disable=not config.train.progress_bar
                  or jax.process_index() != 0, desc='train')
  log = _StepLog(config, writer, throughput, checkpointer, start, start_norm)

  def run_hooks(step):
    scalars = {}
    for every, fn in step_hooks:
      if step % every == 0 or step == num_steps:
        scalars.update(fn(step, nnx.merge(graphdef, run_setup.policy_params(state.params,
                                                                             reference))))
    if scalars:
      writer.write(step, scalars, tensorboard=True)

  if start == 0:
    run_hooks(0)
  pending = None  # (step, device metrics) of the step before, pulled one step late
  try:
    for step in range(start + 1, num_steps + 1):
      try:
        local = next(train_iterator)
      except StopIteration:
        logging.warning('the training data ran out after step %d (config.data.num_epochs=%d)',
                        step - 1, config.data.num_epochs)
        break
      state, metrics = run_setup.train_step(state, reference, sharding.global_batch(local, mesh))
      if pending is not None:
        log(*pending, bar)
      pending = (step, metrics)
      bar.update(1)
      save_now = (step % config.checkpoint.every_steps == 0 or step == num_steps
                  or preemption.reached(step))
      # Without an eval split (one data file, no holdout) there is nothing to evaluate.
      evaluate_now = ('eval' in splits and config.train.eval_every
                      and step % config.train.eval_every == 0)
      hook_now = any(step % every == 0 or step == num_steps for every, _ in step_hooks)
      if save_now or evaluate_now or hook_now:
        # Synchronize: this step's metrics are checked before anything is saved or evaluated.
        log(step, metrics, bar)
        pending = None
        eval_loss = None
        if evaluate_now:
          scalars = _evaluate(run_setup, state.params, reference, eval_batches(),
                              config.train.eval_batches)
          writer.write(step, scalars)
          eval_loss = scalars.get('eval/loss')
        run_hooks(step)
        if save_now or preemption.raised:
          checkpointer.save(step, state, train_iterator, config_json, eval_loss=eval_loss,
                            force=True)
          log.last_good_step = step
        if preemption.raised:
          break
        log.clock = time.perf_counter()  # evaluation, hooks and saving are not step time
    if pending is not None:
      log(*pending, bar)
  finally:
    checkpointer.wait()
    # Worker processes and their shared-memory buffers go now, not at interpreter exit.
    train_iterator.close()
    preemption.restore()
    bar.close()
    writer.close()
  if config.checkpoint.export_hf and not preemption.raised:  # every process joins the gathers
    export(run_setup, state.params, reference, workdir, config.model.path,
           tokenizer=config.data.tokenizer or config.model.path)
  checkpointer.close()
  return state
