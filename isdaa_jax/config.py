"""Validation of experiment configs: wrong values and incompatible settings become one sentence.

Unknown keys never get this far: `configs/base.get_config()` returns a locked ConfigDict, so a
typo in an experiment file or a `--config.x=y` override fails where it is written, and
ml_collections keeps each key's type. `validate` checks what types cannot: ranges, choices and
combinations.
"""

import ml_collections

from isdaa_jax import reference
from isdaa_jax.host_memory import CHOICES as HOST_MALLOC_CHOICES
from isdaa_jax.data.sources import PARSERS
from isdaa_jax.errors import UserError
from isdaa_jax.losses import LOSS_NAMES, REFERENCE_FREE
from isdaa_jax.model.attention import IMPLEMENTATIONS
from isdaa_jax.model.llama import DTYPES, REMAT_CHOICES
from isdaa_jax.model.lora import TARGETS as LORA_TARGETS

DATA_SOURCES = tuple(PARSERS)


class ConfigError(UserError):
  """A config value the user must change; the message says which and how."""


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets dotted keys in place ({'model.remat': 'dots', ...}), as `--config.model.remat=dots`
  does on the command line; an unknown key raises from the locked ConfigDict. Returns `config`."""
  for dotted, value in overrides.items():
    node = config
    *path, last = dotted.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _choice(value, choices, key: str):
  _require(value in choices,
           f'{key}={value!r} is not one of {", ".join(map(repr, choices))}; set --{key}=...')


def validate_loss(loss: ml_collections.ConfigDict):
  _choice(loss.name, LOSS_NAMES, 'config.loss.name')
  _require(loss.beta > 0,
           f'config.loss.beta must be > 0 for {loss.name} (got {loss.beta})'
           + ('; IPO targets a margin of 1/(2*beta)' if loss.name == 'ipo' else ''))
  _require(0.0 <= loss.label_smoothing < 0.5,
           f'config.loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}')
  _require(loss.label_smoothing == 0.0 or loss.name == 'dpo',
           f'config.loss.label_smoothing applies to dpo only; set it to 0 for {loss.name}')
  _require(loss.length_penalty == 0.0 or loss.name == 'rdpo',
           f'config.loss.length_penalty applies to rdpo only; set it to 0 for {loss.name} or use '
           'config.loss.name=rdpo')
  _require(loss.alpha == 0.0 or loss.name == 'alphapo',
           f'config.loss.alpha applies to alphapo only; set it to 0 for {loss.name}')
  _require(loss.sft_weight >= 0.0, f'config.loss.sft_weight must be >= 0, got {loss.sft_weight}')
  _choice(loss.sft_normalize, ('mean', 'sum'), 'config.loss.sft_normalize')
  _require(loss.importance.eps > 0.0,
           f'config.loss.importance.eps must be > 0 (the weight is clipped at exp(2*eps)), '
           f'got {loss.importance.eps}')
  _choice(loss.importance.log_ratio, ('sum', 'token_mean'), 'config.loss.importance.log_ratio')
  _require(loss.importance.min_log_weight <= 0.0,
           f'config.loss.importance.min_log_weight must be <= 0 (-inf = no lower clip; the weight '
           f'is 1 at initialization), got {loss.importance.min_log_weight}')


def validate_model(model: ml_collections.ConfigDict):
  _choice(model.param_dtype, DTYPES, 'config.model.param_dtype')
  _choice(model.dtype, DTYPES, 'config.model.dtype')
  _choice(model.remat, REMAT_CHOICES, 'config.model.remat')
  _choice(model.attention, IMPLEMENTATIONS, 'config.model.attention')
  _require(model.logprob_chunk_size >= 0,
           f'config.model.logprob_chunk_size must be >= 0 (0 = no chunking), '
           f'got {model.logprob_chunk_size}')
  if not model.path and not model.preset:
    _require(model.num_heads % model.num_kv_heads == 0,
             f'config.model.num_heads ({model.num_heads}) must be a multiple of '
             f'config.model.num_kv_heads ({model.num_kv_heads})')
    for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                'num_kv_heads', 'head_dim'):
      _require(model[key] > 0, f'config.model.{key} must be > 0, got {model[key]}')
  validate_lora(model.lora)


def validate_lora(lora: ml_collections.ConfigDict):
  _require(lora.rank >= 0, f'config.model.lora.rank must be >= 0 (0 = no LoRA), got {lora.rank}')
  if not lora.rank:
    _require(not lora.init_from, 'config.model.lora.init_from needs config.model.lora.rank > 0 '
             "(the adapter's rank); set the rank or clear init_from")
    return
  _require(lora.alpha > 0, f'config.model.lora.alpha must be > 0, got {lora.alpha}')
  targets = tuple(lora.targets)
  _require(bool(targets) and all(t in LORA_TARGETS for t in targets)
           and len(set(targets)) == len(targets),
           f'config.model.lora.targets={targets!r} must be distinct names among '
           f'{", ".join(LORA_TARGETS)}')
  _choice(lora.base_dtype, ('',) + DTYPES, 'config.model.lora.base_dtype')


def validate_data(data: ml_collections.ConfigDict):
  _choice(data.source, DATA_SOURCES, 'config.data.source')
  _choice(data.chat_format, ('auto', 'plain'), 'config.data.chat_format')
  if data.source != 'synthetic':
    _require(bool(data.path or data.hub_id),
             f'config.data.source={data.source!r} needs a local file (config.data.path) or a hub '
             'dataset (config.data.hub_id)')
  _require(data.batch_size > 0, f'config.data.batch_size must be > 0, got {data.batch_size}')
  _require(0 < data.max_prompt_length < data.max_length,
           f'config.data.max_prompt_length ({data.max_prompt_length}) must be positive and '
           f'smaller than config.data.max_length ({data.max_length})')
  buckets = tuple(data.length_buckets)
  _require(bool(buckets) and all(b > 0 for b in buckets),
           'config.data.length_buckets must be a non-empty tuple of positive lengths')
  _require(max(buckets) >= data.max_length,
           f'the largest of config.data.length_buckets ({max(buckets)}) must be >= '
           f'config.data.max_length ({data.max_length}) so every kept pair fits a bucket')
  _require(data.pack_length >= 0,
           f'config.data.pack_length must be >= 0 (0 = the largest bucket), got {data.pack_length}')
  if data.packing and data.pack_length:
    longest = 2 * data.max_length if data.prefix_sharing else data.max_length
    _require(data.pack_length >= longest,
             f'config.data.pack_length ({data.pack_length}) must hold the longest packed unit: '
             f'{longest} tokens (config.data.max_length'
             f'{" x 2 with prefix_sharing" if data.prefix_sharing else ""}); raise it or set 0')
  _require(data.num_epochs > 0, f'config.data.num_epochs must be > 0, got {data.num_epochs}')
  _require(data.worker_count >= 0,
           f'config.data.worker_count must be >= 0, got {data.worker_count}')


def validate_optimizer(opt: ml_collections.ConfigDict, batch_size: int):
  _require(opt.learning_rate > 0,
           f'config.optimizer.learning_rate must be > 0, got {opt.learning_rate}')
  _require(opt.warmup_steps >= 0,
           f'config.optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}')
  _require(0.0 <= opt.min_lr_ratio <= 1.0,
           f'config.optimizer.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}')
  _require(opt.grad_clip_norm >= 0,
           f'config.optimizer.grad_clip_norm must be >= 0 (0 disables), got {opt.grad_clip_norm}')
  _require(opt.grad_accum_steps >= 1,
           f'config.optimizer.grad_accum_steps must be >= 1, got {opt.grad_accum_steps}')
  _require(batch_size % opt.grad_accum_steps == 0,
           f'config.data.batch_size ({batch_size}) must be divisible by '
           f'config.optimizer.grad_accum_steps ({opt.grad_accum_steps})')


def validate_mesh(mesh: ml_collections.ConfigDict):
  sizes = (mesh.data, mesh.fsdp, mesh.tensor)
  _require(all(s == -1 or s >= 1 for s in sizes),
           f'config.mesh sizes must be >= 1 or -1 (fill), got data={mesh.data} fsdp={mesh.fsdp} '
           f'tensor={mesh.tensor}')
  _require(sum(s == -1 for s in sizes) <= 1,
           'at most one of config.mesh.data/fsdp/tensor may be -1 (take the remaining devices)')


def validate_reference(train: ml_collections.ConfigDict, loss: ml_collections.ConfigDict):
  _choice(train.reference, reference.MODES, 'config.train.reference')
  _require(not train.reference_cache or train.reference == 'cached',
           f"config.train.reference_cache applies to config.train.reference='cached' only; set "
           f"it or clear reference_cache (reference={train.reference!r})")
  if train.reference == 'none':
    _require(not loss.importance.enabled,
             'importance weighting needs reference (or behavior) log-probs: set '
             "config.train.reference='model', 'precomputed' or 'cached', or "
             'config.loss.importance.enabled=False')
    _require(loss.name in REFERENCE_FREE,
             f"config.loss.name={loss.name!r} needs reference log-probs: set "
             "config.train.reference='model', 'precomputed' or 'cached' (only simpo and "
             'alphapo are reference-free)')


def validate_sample_eval(s: ml_collections.ConfigDict):
  _require(s.every >= 0, f'config.sample_eval.every must be >= 0 (0 = off), got {s.every}')
  if s.every:
    _require(bool(s.prompts), 'config.sample_eval.every > 0 needs config.sample_eval.prompts (a '
             'JSONL of prompt_ids)')
    _require(bool(s.gold) != bool(s.reward_model),
             'config.sample_eval needs exactly one of config.sample_eval.gold '
             '(package.module:function) or config.sample_eval.reward_model (a folder or hub id)')
    _require(s.max_new_tokens > 0,
             f'config.sample_eval.max_new_tokens must be > 0, got {s.max_new_tokens}')


def validate(config: ml_collections.ConfigDict):
  """Raises ConfigError with one sentence for the first problem found."""
  validate_model(config.model)
  validate_data(config.data)
  validate_loss(config.loss)
  validate_optimizer(config.optimizer, config.data.batch_size)
  validate_mesh(config.mesh)
  validate_reference(config.train, config.loss)
  validate_sample_eval(config.sample_eval)
  _require(not (config.model.lora.rank and config.train.reference_path),
           'with LoRA the reference is the base model (adapters off); clear '
           'config.train.reference_path or set config.model.lora.rank=0')
  _require(config.train.num_steps > 0,
           f'config.train.num_steps must be > 0, got {config.train.num_steps}')
  _require(config.checkpoint.keep_last >= 1,
           f'config.checkpoint.keep_last must be >= 1, got {config.checkpoint.keep_last}')
  _require(config.checkpoint.every_steps >= 1,
           'config.checkpoint.every_steps must be >= 1 (the last step is always saved, so a '
           f'value above train.num_steps saves only at the end), got '
           f'{config.checkpoint.every_steps}')
  ratio = config.train.max_param_norm_ratio
  _require(ratio == 0 or ratio > 1,
           'config.train.max_param_norm_ratio must be > 1 (a multiple of the starting parameter '
           f'norm) or 0 (off), got {ratio}')
  _require(config.train.log_every >= 1,
           'config.train.log_every must be >= 1 (a value above train.num_steps logs only the '
           f'last step), got {config.train.log_every}')
  _choice(config.distributed.initialize, ('auto', 'on', 'off'), 'config.distributed.initialize')
  _choice(config.distributed.host_malloc, HOST_MALLOC_CHOICES, 'config.distributed.host_malloc')
