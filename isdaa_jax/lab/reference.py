"""Supervised training of the lab's reference policy on the demonstration distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from isdaa_jax.data import collate
from isdaa_jax.lab.task import Task
from isdaa_jax.model import pair_logps
from isdaa_jax.model.llama import Llama, LlamaConfig


def _nll(model, batch):
  lp, n = pair_logps.side(model, batch, 'chosen', 0)
  return -jnp.sum(lp) / jnp.sum(n)


def train_reference(task: Task, model_cfg: LlamaConfig, sft_config, seed: int):
  """Returns (reference model, token NLL of its last training batch)."""
  rng = np.random.default_rng(seed)
  prompts = task.sample_prompts(rng, sft_config.num_demos)
  responses = task.sample_demonstrations(rng, prompts)
  pairs = [dict(prompt_ids=p, chosen_ids=r, rejected_ids=r) for p, r in zip(prompts, responses)]
  seq_len = task.prompt_length + task.max_response + 1
  data = collate.collate_pairs(pairs, seq_len)
  data = {k: v for k, v in data.items() if k.startswith('chosen_')}

  # Pure-array init and step under jax.jit: eager init compiles each random op on its own, and
  # nnx.jit's per-call graph bookkeeping cost more than this tiny model's step.
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(seed))))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(model_cfg, rngs=nnx.Rngs(seed)))))()
  tx = optax.adam(sft_config.learning_rate)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: _nll(nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  loss = jnp.nan
  n = sft_config.num_demos
  for _ in range(sft_config.steps):
    idx = rng.integers(0, n, sft_config.batch_size)
    params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in data.items()})
  return nnx.merge(graphdef, params), float(loss)
