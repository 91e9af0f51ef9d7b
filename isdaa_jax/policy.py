"""The starting policy and the reference: built or loaded, placed sharded on the mesh.

  cfg, graphdef, params_sharding, params = build_policy(config.model, mesh, config.seed)
  reference_params = build_reference(config, mesh, params, params_sharding)  # {} unless 'model'
  attach_cached_reference(config, workdir, mesh, {'train': store}, graphdef, params)  # 'cached'
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from isdaa_jax import sharding
from isdaa_jax.model.llama import Llama, LlamaConfig


def param_shardings(abstract_model: nnx.Module, mesh) -> dict:
  """Pure-dict NamedShardings of a model's parameters, from their logical axes."""
  return nnx.to_pure_dict(sharding.state_shardings(nnx.state(abstract_model), mesh))


def build_policy(model_config, mesh, seed: int):
  """(LlamaConfig, graphdef, params sharding, params) of the starting policy, placed sharded."""
  if model_config.path:
    from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
    model = hf.load_model(model_config.path, model_config, mesh)
    cfg = model.cfg
    graphdef = nnx.graphdef(model)
    shardings = param_shardings(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), mesh)
    return cfg, graphdef, shardings, nnx.to_pure_dict(nnx.state(model))
  cfg = LlamaConfig.from_model_config(model_config)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))
  shardings = param_shardings(abstract, mesh)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)))),
                   out_shardings=shardings)()
  return cfg, nnx.graphdef(abstract), shardings, params


def _reference_path_params(config, mesh):
  """Params of config.train.reference_path (None when the reference is the starting policy)."""
  if not config.train.reference_path:
    return None
  ref_model_config = copy.deepcopy(config.model)
  ref_model_config.path = config.train.reference_path
  return build_policy(ref_model_config, mesh, config.seed)[3]


def build_reference(config, mesh, policy_params, params_sharding):
  """Frozen reference params ({} when no reference model is held)."""
  if config.train.reference != 'model':
    return {}
  params = _reference_path_params(config, mesh)
  if params is not None:
    return params
  # A separate copy: the policy's buffers are donated to the step.
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_sharding)(
      policy_params)


def attach_cached_reference(config, workdir, mesh, splits: dict, graphdef, policy_params):
  """config.train.reference='cached': each split's (name -> PairStore) reference log-probs from
  its cache file (`isdaa_jax.reference_cache`) as `reference_*_logps` columns. A missing cache is
  computed with the reference model, which is loaded for that alone and dropped afterwards."""
  from isdaa_jax import reference_cache, score  # pylint: disable=g-import-not-at-top
  held = {}  # the reference model while a missing cache is computed

  def compute(pairs, split):
    if not held:
      params = _reference_path_params(config, mesh)
      held['model'] = nnx.merge(graphdef, policy_params if params is None else params)
    scores = score.score_pairs(
        held['model'], pairs, mesh, batch_size=config.data.batch_size,
        length_buckets=config.data.length_buckets, chunk_size=config.model.logprob_chunk_size,
        progress=config.train.progress_bar, desc=f'reference log-probs ({split})',
        prefix_sharing=config.data.prefix_sharing)
    return dataclasses.asdict(scores)

  shared = reference_cache.shared_components(
      tokenizer=config.data.tokenizer or config.model.path, data_config=config.data,
      reference=config.train.reference_path or config.model.path, model_config=config.model,
      seed=config.seed)
  for split, pairs in splits.items():
    key = reference_cache.key_for(pairs, shared)
    path = reference_cache.cache_path(config.train.reference_cache, workdir, key, split)
    arrays, _ = reference_cache.load_or_compute(path, key, lambda p=pairs, s=split: compute(p, s))
    pairs.columns['reference_chosen_logps'] = arrays['chosen_logps']
    pairs.columns['reference_rejected_logps'] = arrays['rejected_logps']
  held.clear()  # no reference parameters stay on device
