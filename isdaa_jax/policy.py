"""The starting policy: its architecture from the config alone, its weights built or loaded and
placed sharded on the mesh.

  cfg, graphdef, params_sharding, abstract_params = abstract_policy(config.model, mesh, seed)
  params = load_params(config.model, mesh, config.seed, params_sharding)

With LoRA (`model.lora.rank > 0`) the trained params are the adapters; the base is frozen:
  (cfg, graphdef, base_graphdef, base_sharding, abstract_base, adapter_sharding,
   abstract_adapters) = abstract_lora_policy(config.model, mesh, seed)
  base = load_params(base_model_config(config.model), mesh, seed, base_sharding)
  adapters = load_adapters(config.model, cfg, mesh, seed, adapter_sharding)

Scoring and sampling a checkpoint (`score`, `evaluate`): `load_model(config.model, path, mesh)`,
which merges `model.lora.init_from`'s PEFT adapter into it when one is set.
"""

import copy
import dataclasses

import jax
from flax import nnx

from isdaa_jax import sharding
from isdaa_jax.model import lora
from isdaa_jax.model.llama import Llama, LlamaConfig


def param_shardings(abstract_model: nnx.Module, mesh) -> dict:
  """Pure-dict NamedShardings of a model's parameters, from their logical axes."""
  return nnx.to_pure_dict(sharding.state_shardings(nnx.state(abstract_model), mesh))


def model_config(model_config_section) -> LlamaConfig:
  """The architecture: `model.path`'s config.json (nothing else is read), else the config's own
  fields or preset."""
  if model_config_section.path:
    from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
    return hf.load_config(model_config_section.path, model_config_section)
  return LlamaConfig.from_model_config(model_config_section)


def abstract_policy(model_config_section, mesh, seed: int):
  """(LlamaConfig, graphdef, params sharding, params as ShapeDtypeStructs): all but the weights."""
  cfg = model_config(model_config_section)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))
  return (cfg, nnx.graphdef(abstract), param_shardings(abstract, mesh),
          nnx.to_pure_dict(nnx.state(abstract)))


def load_params(model_config_section, mesh, seed: int, params_sharding) -> dict:
  """The starting weights (pure dict), placed on `params_sharding`: `model.path`'s checkpoint, or
  a random initialization with `seed`."""
  if model_config_section.path:
    from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
    return nnx.to_pure_dict(nnx.state(hf.load_model(model_config_section.path,
                                                    model_config_section, mesh)))
  cfg = LlamaConfig.from_model_config(model_config_section)
  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)))),
                 out_shardings=params_sharding)()


def build_policy(model_config_section, mesh, seed: int):
  """(LlamaConfig, graphdef, params sharding, params) of the starting policy, placed sharded."""
  cfg, graphdef, shardings, _ = abstract_policy(model_config_section, mesh, seed)
  return cfg, graphdef, shardings, load_params(model_config_section, mesh, seed, shardings)


def base_model_config(model_config_section):
  """`config.model` of the frozen LoRA base: `lora.base_dtype` (when set) as its param_dtype."""
  base_dtype = model_config_section.lora.base_dtype
  if not model_config_section.lora.rank or not base_dtype:
    return model_config_section
  out = copy.deepcopy(model_config_section)
  out.param_dtype = base_dtype
  return out


def abstract_lora_policy(model_config_section, mesh, seed: int):
  """(adapted LlamaConfig, its graphdef, the base's graphdef, the base's params sharding, the
  base as ShapeDtypeStructs, the adapters' sharding, the adapters as ShapeDtypeStructs) for
  `model.lora.rank > 0`."""
  base_cfg, base_graphdef, base_sharding, abstract_base = abstract_policy(
      base_model_config(model_config_section), mesh, seed)
  cfg = dataclasses.replace(base_cfg, lora=lora.LoraSpec.from_config(model_config_section))
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))
  _, adapter_sharding = lora.split(param_shardings(abstract, mesh))
  _, abstract_adapters = lora.split(nnx.to_pure_dict(nnx.state(abstract)))
  return (cfg, nnx.graphdef(abstract), base_graphdef, base_sharding, abstract_base,
          adapter_sharding, abstract_adapters)


def load_adapters(model_config_section, cfg: LlamaConfig, mesh, seed: int,
                  adapter_sharding) -> dict:
  """The starting adapters (pure dict), placed on `adapter_sharding`: `model.lora.init_from`'s
  PEFT adapter, or A initialized as PEFT does and B = 0 (the adapted model equals the base)."""
  if model_config_section.lora.init_from:
    from isdaa_jax.model import peft  # pylint: disable=g-import-not-at-top
    return peft.load_adapter(model_config_section.lora.init_from, cfg, adapter_sharding)

  def init():
    # Only the adapters leave the jit: the base's random initialization is dead code there.
    return lora.split(nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)))))[1]
  return jax.jit(init, out_shardings=adapter_sharding)()


def load_model(model_config_section, path: str, mesh) -> Llama:
  """The checkpoint at `path` as a model to score or sample; with `model.lora.init_from` set,
  that PEFT adapter merged into it (the adapted policy, as a LoRA run from `path` starts)."""
  from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
  model = hf.load_model(path, model_config_section, mesh)
  if not (model_config_section.lora.rank and model_config_section.lora.init_from):
    return model
  spec = lora.LoraSpec.from_config(model_config_section)
  cfg = dataclasses.replace(model.cfg, lora=spec)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  _, adapter_sharding = lora.split(param_shardings(abstract, mesh))
  adapters = load_adapters(model_config_section, cfg, mesh, 0, adapter_sharding)
  graphdef, state = nnx.split(model)
  base = nnx.to_pure_dict(state)
  merged = jax.jit(lambda b, a: lora.merge_into_base(b, a, spec),
                   out_shardings=jax.tree.map(lambda x: x.sharding, base))(base, adapters)
  nnx.replace_by_pure_dict(state, merged)
  return nnx.merge(graphdef, state)
