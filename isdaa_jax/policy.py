"""The starting policy: its architecture from the config alone, its weights built or loaded and
placed sharded on the mesh.

  cfg, graphdef, params_sharding, abstract_params = abstract_policy(config.model, mesh, seed)
  params = load_params(config.model, mesh, config.seed, params_sharding)
"""

import jax
from flax import nnx

from isdaa_jax import sharding
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
