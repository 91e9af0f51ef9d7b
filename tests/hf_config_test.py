"""config.json parsing in the transformers 4.x and 5.x spellings, and writing both."""

import json

import pytest
import transformers

from isdaa_jax import defaults
from isdaa_jax.model import hf_config
from isdaa_jax.model.llama import LlamaConfig

SIZES = dict(model_type='llama', vocab_size=128, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
V5 = dict(SIZES, dtype='bfloat16',
          rope_parameters=dict(LLAMA3, rope_type='llama3', rope_theta=500000.0))
V4 = dict(SIZES, torch_dtype='bfloat16', rope_theta=500000.0,
          rope_scaling=dict(LLAMA3, rope_type='llama3'))
# Early Llama 3.1 configs spelled the scaling type as `type`.
V4_OLD = dict(SIZES, torch_dtype='bfloat16', rope_theta=500000.0,
              rope_scaling=dict(LLAMA3, type='llama3'))


@pytest.mark.parametrize('hf', [V5, V4, V4_OLD], ids=['v5', 'v4', 'v4_type'])
def test_both_spellings_give_the_same_config(hf):
  cfg = hf_config.from_hf_dict(hf)
  assert cfg == LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8, rope_theta=500000.0,
      rope_scaling=dict(LLAMA3, rope_type='llama3'), rms_norm_eps=1e-6,
      tie_word_embeddings=False, max_position_embeddings=2048, param_dtype='bfloat16',
      dtype='bfloat16')


def test_defaults_of_the_format_fill_absent_keys():
  hf = {k: v for k, v in SIZES.items() if k != 'num_key_value_heads'}
  cfg = hf_config.from_hf_dict(hf)
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) == (4, 8, 1e4, None)
  assert (cfg.param_dtype, cfg.dtype) == ('float32', 'float32')
  default_v5 = dict(SIZES, rope_parameters=dict(rope_type='default', rope_theta=123.0))
  assert hf_config.from_hf_dict(default_v5).rope_theta == 123.0


def test_execution_policy_comes_from_the_model_config():
  model_config = defaults.get_config().model
  model_config.param_dtype, model_config.dtype, model_config.remat = 'float32', 'bfloat16', 'full'
  model_config.scan_layers = True
  cfg = hf_config.from_hf_dict(V5, model_config)
  assert (cfg.param_dtype, cfg.dtype, cfg.remat, cfg.scan_layers) == (
      'float32', 'bfloat16', 'full', True)


@pytest.mark.parametrize('change,match', [
    (dict(model_type='qwen2'), "model_type 'qwen2'"),
    (dict(rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=4.0)), "'yarn'"),
    (dict(rope_parameters=dict(rope_type='llama3', rope_theta=1e4, factor=4.0)),
     'low_freq_factor'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(vocab_size=None), 'vocab_size'),
])
def test_unsupported_configs_raise_one_sentence(change, match):
  hf = {k: v for k, v in dict(V5, **change).items() if v is not None}
  with pytest.raises(hf_config.ModelFileError, match=match) as e:
    hf_config.from_hf_dict(hf)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('cfg', [
    LlamaConfig.tiny(),
    LlamaConfig.preset('llama3.1-8b'),
    LlamaConfig.preset('llama3.2-1b', param_dtype='bfloat16', dtype='bfloat16'),
], ids=['tiny', '8b', '1b_bf16'])
def test_written_config_reads_back_here_and_in_transformers(cfg, tmp_path):
  out = hf_config.to_hf_dict(cfg, 'LlamaForCausalLM', eos_token_id=7)
  assert out['eos_token_id'] == 7
  assert hf_config.from_hf_dict(out) == cfg
  # transformers 4.x reads only the old spelling: it alone must describe the model too.
  v4_only = {k: v for k, v in out.items() if k not in ('rope_parameters', 'dtype')}
  assert hf_config.from_hf_dict(v4_only) == cfg
  (tmp_path / 'config.json').write_text(json.dumps(out))
  t = transformers.AutoConfig.from_pretrained(tmp_path)
  assert type(t).__name__ == 'LlamaConfig'
  assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
          t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.tie_word_embeddings,
          t.rms_norm_eps) == (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
                              cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              cfg.tie_word_embeddings, cfg.rms_norm_eps)
  expected_rope = dict(cfg.rope_scaling or dict(rope_type='default'), rope_theta=cfg.rope_theta)
  assert t.rope_parameters == expected_rope
