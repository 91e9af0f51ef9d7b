"""Hugging Face Llama config.json <-> `LlamaConfig`, in the transformers 4.x and 5.x spellings.

transformers 5 writes `rope_parameters` = {rope_type, rope_theta, scaling fields} and `dtype`;
4.x wrote `rope_theta`, `rope_scaling` = {rope_type (or older `type`), scaling fields} and
`torch_dtype`. Both are read, and both are written so that either version loads a saved model.
"""

from typing import Any, Optional

from isdaa_jax.errors import ModelFileError  # re-exported: hf_config.ModelFileError
from isdaa_jax.model.llama import LlamaConfig, execution_policy


# transformers' LlamaConfig defaults for keys a config.json may leave out (the format's defaults,
# not ours: a file written without them means these values).
_HF_DEFAULTS = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_theta=10000.0, hidden_act='silu', attention_bias=False, mlp_bias=False)
_REQUIRED = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
             'num_attention_heads')
_LLAMA3_FIELDS = ('factor', 'low_freq_factor', 'high_freq_factor',
                  'original_max_position_embeddings')
_PARAM_DTYPES = {'bfloat16': 'bfloat16', 'float32': 'float32', 'float16': 'float32',
                 'float64': 'float32'}


def _rope(hf: dict, where: str) -> tuple[float, Optional[dict]]:
  """(rope_theta, rope_scaling for LlamaConfig) from either spelling."""
  params = hf.get('rope_parameters')
  if params is None:  # transformers 4.x
    params = dict(hf.get('rope_scaling') or {})
    params['rope_theta'] = hf.get('rope_theta', _HF_DEFAULTS['rope_theta'])
  params = dict(params)
  theta = float(params.get('rope_theta', hf.get('rope_theta', _HF_DEFAULTS['rope_theta'])))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return theta, None
  if rope_type != 'llama3':
    raise ModelFileError(f"{where} uses rope_type {rope_type!r}, which isdaa_jax does not "
                          "implement; only 'default' and 'llama3' Llama checkpoints are supported")
  missing = [k for k in _LLAMA3_FIELDS if k not in params]
  if missing:
    raise ModelFileError(f'{where} has llama3 rope scaling without {missing[0]!r}; the '
                          'config.json is incomplete')
  scaling = dict(rope_type='llama3', factor=float(params['factor']),
                 low_freq_factor=float(params['low_freq_factor']),
                 high_freq_factor=float(params['high_freq_factor']),
                 original_max_position_embeddings=int(params['original_max_position_embeddings']))
  return theta, scaling


def from_hf_dict(hf: dict, model_config=None, where: str = 'config.json') -> LlamaConfig:
  """LlamaConfig from a parsed config.json.

  The execution policy (dtypes, remat, scan, attention) comes from `model_config` (`config.model`)
  when given; otherwise parameters and compute take the checkpoint's dtype (bfloat16 stays
  bfloat16, anything else becomes float32).
  """
  if hf.get('model_type') != 'llama':
    raise ModelFileError(f"{where} has model_type {hf.get('model_type')!r}, not 'llama'; "
                          'isdaa_jax reads Llama-family checkpoints only')
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ModelFileError(f'{where} has no {missing[0]!r}; the config.json is incomplete')
  get = lambda key: hf[key] if hf.get(key) is not None else _HF_DEFAULTS[key]
  for key, supported in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if get(key) != supported:
      raise ModelFileError(f'{where} sets {key}={get(key)!r}, which isdaa_jax does not '
                            f'implement (Llama uses {supported!r})')
  theta, scaling = _rope(hf, where)
  heads = int(hf['num_attention_heads'])
  if model_config is not None:
    policy = execution_policy(model_config)
  else:
    dtype = _PARAM_DTYPES.get(str(hf.get('dtype') or hf.get('torch_dtype') or 'float32'),
                              'float32')
    policy = dict(param_dtype=dtype, dtype=dtype)
  return LlamaConfig(
      vocab_size=int(hf['vocab_size']), hidden_size=int(hf['hidden_size']),
      intermediate_size=int(hf['intermediate_size']), num_layers=int(hf['num_hidden_layers']),
      num_heads=heads, num_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=int(hf.get('head_dim') or int(hf['hidden_size']) // heads),
      rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(get('rms_norm_eps')),
      tie_word_embeddings=bool(get('tie_word_embeddings')),
      max_position_embeddings=int(get('max_position_embeddings')), **policy)


def to_hf_dict(cfg: LlamaConfig, architecture: str, **extra: Any) -> dict:
  """config.json contents for `cfg`, readable by transformers 4.x and 5.x; `extra` is merged."""
  rope = dict(cfg.rope_scaling) if cfg.rope_scaling else dict(rope_type='default')
  out = dict(
      architectures=[architecture], model_type='llama', vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act='silu',
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
      # transformers 5.x spelling.
      rope_parameters=dict(rope, rope_theta=cfg.rope_theta), dtype=cfg.param_dtype,
      # transformers 4.x spelling of the same (5.x reads rope_parameters first).
      rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
      torch_dtype=cfg.param_dtype,
  )
  out.update(extra)
  return out
