"""Supervised training of the lab's reference policy on the demonstration distribution."""

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

  model = Llama(model_cfg, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(sft_config.learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(_nll)(model, batch)
    optimizer.update(model, grads)
    return loss

  loss = jnp.nan
  n = sft_config.num_demos
  for i in range(sft_config.steps):
    idx = rng.integers(0, n, sft_config.batch_size)
    loss = step(model, optimizer, {k: v[idx] for k, v in data.items()})
  return model, float(loss)
