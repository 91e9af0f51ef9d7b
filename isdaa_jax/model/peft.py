"""LoRA adapters <-> PEFT adapter folders (adapter_config.json + adapter_model.safetensors).

PEFT names the adapter of a Llama projection
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [R, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, R]
and scales it by lora_alpha / r (unless use_rslora). Ours are stacked over layers, A [L, *in, R]
and B [L, R, *out] (isdaa_jax/model/lora.py), with the heads split out in HF's (head, dim) order,
so each PEFT matrix is one layer's A or B flattened and transposed. No torch and no peft here.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from isdaa_jax.errors import UserError
from isdaa_jax.model import lora as lora_lib
from isdaa_jax.model import safetensors_io
from isdaa_jax.model.llama import Llama, LlamaConfig

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
# lora.TARGETS name -> the Hugging Face module under model.layers.{i}.
MODULES = {
    'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
    'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
    'down': 'mlp.down_proj',
}
_PREFIX = 'base_model.model.model.layers'


class AdapterError(UserError):
  """A PEFT adapter folder that does not fit this model or config."""


def tensor_name(layer: int, target: str, which: str) -> str:
  """PEFT's key of one layer's lora_A / lora_B weight (`which` 'A' or 'B')."""
  return f'{_PREFIX}.{layer}.{MODULES[target]}.lora_{which}.weight'


def adapter_config(spec: lora_lib.LoraSpec, base_name: str) -> dict:
  """adapter_config.json as PEFT (0.21) writes it for a plain LoRA: every key its LoraConfig
  saves (tests/fixtures/lora_gqa/expected.json holds the list peft wrote)."""
  return {
      'alora_invocation_tokens': None, 'alpha_pattern': {}, 'arrow_config': None, 'auto_mapping': None,
      'base_model_name_or_path': base_name or None, 'bias': 'none', 'corda_config': None,
      'ensure_weight_tying': False, 'eva_config': None, 'exclude_modules': None,
      'fan_in_fan_out': False, 'inference_mode': True, 'init_lora_weights': True,
      'kasa_config': None, 'layer_replication': None, 'layers_pattern': None, 'layers_to_transform': None,
      'loftq_config': {}, 'lora_alpha': spec.alpha, 'lora_bias': False, 'lora_dropout': 0.0,
      'lora_ga_config': None, 'megatron_config': None, 'megatron_core': 'megatron.core',
      'modules_to_save': None, 'monteclora_config': None, 'peft_type': 'LORA', 'peft_version': None, 'qalora_group_size': 16,
      'r': spec.rank, 'rank_pattern': {}, 'revision': None,
      'target_modules': sorted(MODULES[t].split('.')[1] for t in spec.targets),
      'target_parameters': None, 'task_type': 'CAUSAL_LM', 'trainable_token_indices': None,
      'use_bdlora': None, 'use_dora': False, 'use_qalora': False, 'use_rslora': False,
      'velora_config': None,
  }


def _replicated_host(x: jax.Array) -> np.ndarray:
  # Adapters are small: every process gets the whole array (the gather is collective).
  full = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
  return np.asarray(full.addressable_data(0))


def save_adapter(adapters: dict, cfg: LlamaConfig, out_dir, *, base_name: str = '') -> None:
  """Writes the adapters in PEFT format; `peft.PeftModel.from_pretrained(base, out_dir)` loads
  them over the base checkpoint."""
  spec = cfg.lora
  layers = {k: _replicated_host(v) for k, v in adapters['layers'].items()}
  specs, arrays = [], {}
  for target in spec.targets:
    kernel = lora_lib.TARGETS[target][0]
    a, b = layers[kernel + '_lora_a'], layers[kernel + '_lora_b']
    for i in range(cfg.num_layers):
      arrays[tensor_name(i, target, 'A')] = a[i].reshape(-1, spec.rank).T
      arrays[tensor_name(i, target, 'B')] = b[i].reshape(spec.rank, -1).T
  specs = [(name, x.shape, x.dtype) for name, x in arrays.items()]
  if jax.process_index() != 0:
    return
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  safetensors_io.write(out / WEIGHTS_FILE, specs, arrays.__getitem__, {'format': 'pt'})
  (out / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, base_name), indent=2,
                                            sort_keys=True))


def _check_config(folder: pathlib.Path, spec: lora_lib.LoraSpec):
  path = folder / CONFIG_FILE
  if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
    raise AdapterError(f'config.model.lora.init_from={str(folder)!r} is not a PEFT adapter folder '
                       f'(it needs {CONFIG_FILE} and {WEIGHTS_FILE}); point it at one')
  c = json.loads(path.read_text())
  modules = c.get('target_modules') or []
  modules = sorted([modules] if isinstance(modules, str) else modules)
  wanted = sorted(MODULES[t].split('.')[1] for t in spec.targets)
  if c.get('peft_type') != 'LORA' or c.get('use_rslora') or c.get('use_dora'):
    raise AdapterError(f'{path} is not a plain LoRA adapter (peft_type LORA without rslora or '
                       'DoRA); only those can start config.model.lora')
  for key, ours, what in (('r', spec.rank, 'rank'), ('lora_alpha', spec.alpha, 'alpha'),
                          ('target_modules', wanted, 'targets')):
    theirs = modules if key == 'target_modules' else c.get(key)
    if theirs != ours:
      raise AdapterError(f'the adapter in {folder} has {key}={theirs!r} but '
                         f'config.model.lora.{what} is {ours!r}; set config.model.lora.{what} '
                         'to match it')


def load_adapter(folder, cfg: LlamaConfig, adapter_sharding: dict) -> dict:
  """A PEFT adapter folder as our stacked adapters (pure dict), placed on `adapter_sharding`."""
  folder = pathlib.Path(folder)
  spec = cfg.lora
  _check_config(folder, spec)
  reader = safetensors_io.Reader(str(folder / WEIGHTS_FILE))
  known = set(reader.keys())
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  _, abstract = lora_lib.split(nnx.to_pure_dict(nnx.state(model)))
  out = {}
  for target in spec.targets:
    kernel = lora_lib.TARGETS[target][0]
    for which, suffix in (('A', '_lora_a'), ('B', '_lora_b')):
      shape = abstract['layers'][kernel + suffix].shape
      per_layer = []
      for i in range(cfg.num_layers):
        name = tensor_name(i, target, which)
        if name not in known:
          raise AdapterError(f'the adapter in {folder} has no tensor {name!r}; it was made for '
                             'another model (layer count or targets)')
        w = reader.array(name).T  # ours: [in, R] (A) or [R, out] (B), flattened
        if w.size != int(np.prod(shape[1:])) or w.shape[which == 'A'] != spec.rank:
          raise AdapterError(f'tensor {name!r} in {folder} has shape {w.T.shape}, which does not '
                             f'fit this model\'s {target} projection at rank {spec.rank}; the '
                             'adapter was made for another model')
        per_layer.append(w.reshape(shape[1:]))
      full = np.stack(per_layer).astype(jnp.dtype(spec.dtype))
      out[kernel + suffix] = jax.make_array_from_callback(
          shape, adapter_sharding['layers'][kernel + suffix], lambda idx, f=full: f[idx])
  return {'layers': out}
