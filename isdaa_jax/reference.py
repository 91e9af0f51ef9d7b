"""The reference policy: where each pair's reference log-probs come from (`config.train.reference`).

  MODES      'model'        a frozen reference model runs in the train step (8N FLOPs/token)
             'precomputed'  `reference_*_logps` columns of the data (`isdaa_jax.score
                            --as_reference`); no reference model is held
             'cached'       like 'precomputed', read from a file keyed by everything that
                            determines the log-probs (`reference_cache`); a missing file is
                            computed once by a pre-pass with the reference model, then dropped
             'none'         reference-free losses (simpo, alphapo) without importance weighting

  params = build(config, mesh, policy_params, params_sharding)   # {} unless mode 'model'
  splits = attach_cached(config, workdir, mesh, splits, graphdef, policy_params)   # 'cached'
  rp_w, rp_l = step_logps(step_mode(mode), layout, graphdef, params, batch, chunk, lp_w, lp_l)
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from isdaa_jax import layout as layout_lib
from isdaa_jax import policy, scoring

MODES = ('model', 'precomputed', 'cached', 'none')
# What the train step sees: a cached reference is a precomputed one by the time the step runs.
STEP_MODES = ('model', 'precomputed', 'none')


def step_mode(mode: str) -> str:
  return 'precomputed' if mode == 'cached' else mode


def in_step(mode: str) -> bool:
  """Whether the train step runs a reference model (2N more FLOPs per token)."""
  return mode == 'model'


def _path_params(config, mesh):
  """Params of config.train.reference_path (None when the reference is the starting policy)."""
  if not config.train.reference_path:
    return None
  ref_model_config = copy.deepcopy(config.model)
  ref_model_config.path = config.train.reference_path
  _, _, shardings, _ = policy.abstract_policy(ref_model_config, mesh, config.seed)
  return policy.load_params(ref_model_config, mesh, config.seed, shardings)


def build(config, mesh, policy_params, params_sharding) -> dict:
  """Frozen reference params for mode 'model' ({} for every other mode)."""
  if not in_step(config.train.reference):
    return {}
  params = _path_params(config, mesh)
  if params is not None:
    return params
  # A separate copy: the policy's buffers are donated to the step.
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_sharding)(
      policy_params)


def attach_cached(config, workdir, mesh, splits: dict, graphdef, policy_params) -> dict:
  """Mode 'cached': each split (name -> PairStore) as a new store carrying its reference
  log-probs (`reference_*_logps`) from its cache file; a missing cache is computed with the
  reference model, which is loaded for that alone and dropped afterwards."""
  from isdaa_jax import reference_cache  # pylint: disable=g-import-not-at-top
  held = {}  # the reference model while a missing cache is computed
  layout = layout_lib.from_config(config.data)

  def compute(pairs, split):
    if not held:
      params = _path_params(config, mesh)
      held['model'] = nnx.merge(graphdef, policy_params if params is None else params)
    scores = scoring.score_pairs(
        held['model'], pairs, mesh, layout=layout, batch_size=config.data.batch_size,
        chunk_size=config.model.logprob_chunk_size, progress=config.train.progress_bar,
        desc=f'reference log-probs ({split})')
    return dataclasses.asdict(scores)

  shared = reference_cache.shared_components(
      tokenizer=config.data.tokenizer or config.model.path, data_config=config.data,
      reference=config.train.reference_path or config.model.path,
      model_config=policy.base_model_config(config.model), seed=config.seed)
  out = {}
  for split, pairs in splits.items():
    key = reference_cache.key_for(pairs, shared)
    path = reference_cache.cache_path(config.train.reference_cache, workdir, key, split)
    arrays, _ = reference_cache.load_or_compute(path, key, lambda p=pairs, s=split: compute(p, s))
    out[split] = pairs.with_columns({'reference_chosen_logps': arrays['chosen_logps'],
                                     'reference_rejected_logps': arrays['rejected_logps']})
  held.clear()  # no reference parameters stay on device
  return out


def step_logps(mode: str, layout, graphdef, reference_params, batch, chunk_size: int, lp_w, lp_l):
  """(rp_w, rp_l) inside the train step for a step mode (`STEP_MODES`)."""
  if mode == 'model':
    model = nnx.merge(graphdef, jax.lax.stop_gradient(reference_params))
    rp_w, rp_l, _, _ = layout.sequence_logps(model, batch, chunk_size)
    return rp_w, rp_l
  if mode == 'precomputed':
    return batch['reference_chosen_logps'], batch['reference_rejected_logps']
  # Reference-free loss without importance weighting: the reference terms are unused.
  return jnp.zeros_like(lp_w), jnp.zeros_like(lp_l)
