"""A Llama decoder in Flax NNX: RMSNorm, RoPE (default and Llama-3 scaling), GQA, SwiGLU.

Parameters, with their Hugging Face names (W is HF's [out, in] Linear weight) and logical axes:

  embed            [V, D]         model.embed_tokens.weight                  (vocab, embed)
  layers.attn_norm [L, D]         model.layers.i.input_layernorm.weight      (layers, embed)
  layers.wq        [L, D, N, H]   model.layers.i.self_attn.q_proj.weight: W.T.reshape(D, N, H)
  layers.wk        [L, D, K, H]   model.layers.i.self_attn.k_proj.weight: W.T.reshape(D, K, H)
  layers.wv        [L, D, K, H]   model.layers.i.self_attn.v_proj.weight: W.T.reshape(D, K, H)
  layers.wo        [L, N, H, D]   model.layers.i.self_attn.o_proj.weight: W.T.reshape(N, H, D)
  layers.mlp_norm  [L, D]         model.layers.i.post_attention_layernorm.weight
  layers.w_gate    [L, D, F]      model.layers.i.mlp.gate_proj.weight: W.T
  layers.w_up      [L, D, F]      model.layers.i.mlp.up_proj.weight: W.T
  layers.w_down    [L, F, D]      model.layers.i.mlp.down_proj.weight: W.T
  final_norm       [D]            model.norm.weight
  lm_head          [D, V]         lm_head.weight: W.T (absent when embeddings are tied)

The decoder blocks keep their parameters stacked on a leading `layers` axis, so one pure block
function serves the unrolled loop, `jax.lax.scan` over layers, and rematerialization.
RoPE rotates the two halves of each head (HF's rotate_half), not interleaved pairs, so HF's q/k
projection rows need no permutation.

Use:
  hidden_BTD = model(input_ids_BT, positions_BT, segment_ids_BT)  # segment 0 = padding
  hidden_BTD = model(..., attention_mask_BTT=mask)                # any mask, True = may attend
  cache = model.init_cache(batch, max_len)                        # generation
  hidden, cache = model.decode(prompt_BP, pos_BP, seg_BP, cache, 0)   # the prompt, one chunk
  hidden, cache = model.decode(tok_B1, pos_B1, seg_B1, cache, P + i)  # then a token per call
"""

import dataclasses
import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from isdaa_jax.errors import UserError
from isdaa_jax.model import attention as attention_lib
from isdaa_jax.model import lora as lora_lib

Array = jax.Array

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# 'dots' keeps the outputs of the weight matmuls (no batch dimension) and recomputes the rest,
# including the attention score/probability einsums, whose batched [.., T, S] outputs are the
# largest activations of a block.
_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The choices of config.model.remat.
REMAT_CHOICES = ('none',) + tuple(_REMAT_POLICIES)
DTYPES = tuple(_DTYPES)

_LLAMA3_ROPE = dict(rope_type='llama3', low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and execution policy of a Llama model."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # None, or a dict with rope_type 'llama3', factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings.
  rope_scaling: Optional[dict] = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  param_dtype: str = 'float32'
  dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  attention: str = 'xla'
  # LoRA adapters on the decoder projections (isdaa_jax/model/lora.py); None = the plain model.
  lora: Optional[lora_lib.LoraSpec] = None

  PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
      'tiny': dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                   max_position_embeddings=512),
      'llama3.2-1b': dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                          num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                          rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                          tie_word_embeddings=True, max_position_embeddings=131072),
      'llama3.2-3b': dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                          num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                          rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                          tie_word_embeddings=True, max_position_embeddings=131072),
      'llama3.1-8b': dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                          rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
                          tie_word_embeddings=False, max_position_embeddings=131072),
      'llama3.1-70b': dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                           num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                           rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
                           tie_word_embeddings=False, max_position_embeddings=131072),
  }

  @classmethod
  def preset(cls, name: str, **overrides) -> 'LlamaConfig':
    if name not in cls.PRESETS:
      raise UserError(f'unknown model preset {name!r}; choose one of {", ".join(cls.PRESETS)}')
    return cls(**{**cls.PRESETS[name], **overrides})

  @classmethod
  def tiny(cls, **overrides):
    return cls.preset('tiny', **overrides)

  @classmethod
  def from_model_config(cls, model_config) -> 'LlamaConfig':
    """From `config.model`: a preset, or the explicit architecture fields (not `path`)."""
    policy = execution_policy(model_config)
    if model_config.preset:
      return cls.preset(model_config.preset, **policy)
    rs = model_config.rope_scaling
    scaling = None
    if rs.rope_type not in ('', 'default'):
      scaling = dict(rope_type=rs.rope_type, factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                     high_freq_factor=rs.high_freq_factor,
                     original_max_position_embeddings=rs.original_max_position_embeddings)
    return cls(
        vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
        intermediate_size=model_config.intermediate_size, num_layers=model_config.num_layers,
        num_heads=model_config.num_heads, num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim, rope_theta=model_config.rope_theta, rope_scaling=scaling,
        rms_norm_eps=model_config.rms_norm_eps,
        tie_word_embeddings=model_config.tie_word_embeddings,
        max_position_embeddings=model_config.max_position_embeddings, **policy)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def num_params(self) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + l * per_layer + d + head


def execution_policy(model_config) -> dict:
  """The fields of `config.model` that say how to run, not what the architecture is."""
  return dict(param_dtype=model_config.param_dtype, dtype=model_config.dtype,
              remat=model_config.remat, scan_layers=model_config.scan_layers,
              attention=model_config.attention)


def rope_inv_freq(cfg: LlamaConfig) -> Array:
  """Inverse frequencies [H/2], with Llama-3 wavelength-dependent scaling when configured."""
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32)
                                       / cfg.head_dim))
  rs = cfg.rope_scaling
  if not rs or rs.get('rope_type', 'default') in ('default', ''):
    return inv_freq
  if rs['rope_type'] != 'llama3':
    raise UserError(f"rope_type {rs['rope_type']!r} is not supported; use 'llama3' or 'default'")
  factor, low, high = rs['factor'], rs['low_freq_factor'], rs['high_freq_factor']
  old_len = rs['original_max_position_embeddings']
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(is_medium, smoothed, scaled)


def rope_tables(cfg: LlamaConfig, positions_BT: Array):
  """cos, sin of shape [B, T, H], computed in float32."""
  freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
  emb_BTD = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
  return jnp.cos(emb_BTD), jnp.sin(emb_BTD)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  half = x_BTNH.shape[-1] // 2
  x32 = x_BTNH.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
  return out.astype(x_BTNH.dtype)


def rms_norm(x_BTD: Array, weight_D: Array, eps: float) -> Array:
  # Statistics in float32 whatever the compute dtype, as HF does.
  x32 = x_BTD.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return weight_D.astype(x_BTD.dtype) * normed.astype(x_BTD.dtype)


def _init(key, shape, dtype, fan_in):
  return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)


class DecoderLayers(nnx.Module):
  """All decoder blocks, parameters stacked on a leading `layers` axis."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = _DTYPES[cfg.param_dtype]
    p = lambda shape, axes, fan_in: nnx.Param(_init(rngs.params(), shape, pd, fan_in),
                                              logical_axes=axes)
    self.attn_norm = nnx.Param(jnp.ones((L, D), pd), logical_axes=('layers', 'embed'))
    self.wq = p((L, D, N, H), ('layers', 'embed', 'q_heads', 'head_dim'), D)
    self.wk = p((L, D, K, H), ('layers', 'embed', 'kv_heads', 'head_dim'), D)
    self.wv = p((L, D, K, H), ('layers', 'embed', 'kv_heads', 'head_dim'), D)
    self.wo = p((L, N, H, D), ('layers', 'q_heads', 'head_dim', 'embed'), N * H)
    self.mlp_norm = nnx.Param(jnp.ones((L, D), pd), logical_axes=('layers', 'embed'))
    self.w_gate = p((L, D, F), ('layers', 'embed', 'mlp'), D)
    self.w_up = p((L, D, F), ('layers', 'embed', 'mlp'), D)
    self.w_down = p((L, F, D), ('layers', 'mlp', 'embed'), F)
    if cfg.lora is not None:
      kernels = {k: getattr(self, k) for k in cfg.lora.kernels}
      for name, var in lora_lib.make_params(cfg.lora, kernels, rngs).items():
        setattr(self, name, var)

  PARAM_NAMES: ClassVar[tuple[str, ...]] = (
      'attn_norm', 'wq', 'wk', 'wv', 'wo', 'mlp_norm', 'w_gate', 'w_up', 'w_down')

  def _block(self, x_BTD, p, cos, sin, mask, cache_kv=None, cache_index=None):
    """One decoder block on per-layer params `p`; returns (x, (k, v)) with k, v the new cache."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    b, t, d = x_BTD.shape
    # The weight matmuls run on [B*T, D] (M = B*T): XLA's CPU backward of a 'btd,df->btf' einsum
    # contracts two axes for the weight gradient and leaves the GEMM path (~1.7x slower MLP).
    h_MD = rms_norm(x_BTD, p['attn_norm'], cfg.rms_norm_eps).reshape(b * t, d)

    def proj(eq, x, name):
      y = jnp.einsum(eq, x, p[name].astype(dt))
      if name + '_lora_a' in p:
        y = y + lora_lib.delta(x, p[name + '_lora_a'], p[name + '_lora_b'], cfg.lora.scale, dt)
      return y

    q = proj('md,dnh->mnh', h_MD, 'wq').reshape(b, t, *p['wq'].shape[1:])
    k = proj('md,dkh->mkh', h_MD, 'wk').reshape(b, t, *p['wk'].shape[1:])
    v = proj('md,dkh->mkh', h_MD, 'wv').reshape(b, t, *p['wv'].shape[1:])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_kv is not None:
      k_cache, v_cache = cache_kv
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, 1)
    attn_MNH = attention_lib.attention(q, k.astype(dt), v.astype(dt), mask, cfg.attention).reshape(
        b * t, *q.shape[2:])
    x_MD = x_BTD.reshape(b * t, d) + proj('mnh,nhd->md', attn_MNH, 'wo')
    h_MD = rms_norm(x_MD, p['mlp_norm'], cfg.rms_norm_eps)
    gate_MF = proj('md,df->mf', h_MD, 'w_gate')
    up_MF = proj('md,df->mf', h_MD, 'w_up')
    x_MD = x_MD + proj('mf,fd->md', jax.nn.silu(gate_MF) * up_MF, 'w_down')
    return rows_over_data(x_MD.reshape(b, t, d)), (k, v)

  def __call__(self, x_BTD, cos, sin, mask, cache=None, cache_index=None):
    names = self.PARAM_NAMES + (() if self.cfg.lora is None else
                                lora_lib.param_names(self.cfg.lora))
    params = {name: getattr(self, name).get_value() for name in names}

    def block(x, p, kv):
      return self._block(x, p, cos, sin, mask, kv, cache_index)

    if self.cfg.remat != 'none':
      # Inside scan the loop boundary already stops XLA from merging the recomputation into the
      # forward pass, so CSE prevention (extra barriers, slower) is only needed when unrolled.
      block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.cfg.remat],
                             prevent_cse=not self.cfg.scan_layers)
    kv_all = None if cache is None else (cache['k'], cache['v'])

    if self.cfg.scan_layers:
      def step(x, xs):
        p, kv = xs
        x, new_kv = block(x, p, kv)
        return x, (new_kv if cache is not None else None)
      x_BTD, new_kv = jax.lax.scan(step, x_BTD, (params, kv_all))
    else:
      new_k, new_v = [], []
      for i in range(self.cfg.num_layers):
        p_i = {name: a[i] for name, a in params.items()}
        kv_i = None if kv_all is None else (kv_all[0][i], kv_all[1][i])
        x_BTD, (k, v) = block(x_BTD, p_i, kv_i)
        new_k.append(k)
        new_v.append(v)
      new_kv = None if cache is None else (jnp.stack(new_k), jnp.stack(new_v))
    return x_BTD, new_kv


# The data-parallel mesh axes (isdaa_jax.sharding.BATCH_AXES; the model does not import the
# sharding module, which sits above it).
DATA_PARALLEL_AXES = ('data', 'fsdp')


def data_parallel_axes(mesh) -> tuple[str, ...]:
  """The data-parallel axes that `mesh` (concrete or abstract) has."""
  return tuple(a for a in DATA_PARALLEL_AXES if a in mesh.axis_names)


def rows_over_data(x: Array) -> Array:
  """`x` [B, ...] with its rows split over the data-parallel axes of the mesh in context.

  Without it XLA's sharding propagation may keep the fsdp-sharded weights in place and compute
  every row on every fsdp device, all-reducing the activations (measured for a TPU v5p slice by
  isdaa_jax.plan: 4.6x the parameter bytes all-reduced per step), instead of gathering the
  weights for the device's own rows (FSDP). No mesh in context (eager use, sampling): unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = data_parallel_axes(mesh)
  if mesh.empty or not axes:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1))))


class Llama(nnx.Module):
  """Token ids -> final-norm hidden states [B, T, D]; `unembedding()` gives the [D, V] head."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = _DTYPES[cfg.param_dtype]
    # std 1/sqrt(D): tied output logits start O(1), so a random model is a broad distribution.
    self.embed = nnx.Param(
        _init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd, cfg.hidden_size),
        logical_axes=('vocab', 'embed'))
    self.layers = DecoderLayers(cfg, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pd), logical_axes=('embed',))
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(
          _init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pd, cfg.hidden_size),
          logical_axes=('embed', 'vocab'))

  def unembedding(self) -> Array:
    """The output projection [D, V] (the transposed input embedding when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed.get_value().T
    return self.lm_head.get_value()

  def __call__(self, input_ids_BT: Array, positions_BT: Array, segment_ids_BT: Array, *,
               attention_mask_BTT: Optional[Array] = None) -> Array:
    """Final-RMSNorm hidden states; attention stays within equal non-zero segments, causally.

    `attention_mask_BTT` (True = may attend), when given, replaces the segment/causal mask
    (prefix-shared layouts build their own).
    """
    if attention_mask_BTT is None:
      attention_mask_BTT = attention_lib.segment_causal_mask(segment_ids_BT)
    hidden, _ = self._forward(input_ids_BT, positions_BT, attention_mask_BTT)
    return hidden

  def _forward(self, input_ids_BT, positions_BT, mask, cache=None, cache_index=None):
    cfg = self.cfg
    x = rows_over_data(
        jnp.take(self.embed.get_value(), input_ids_BT, axis=0).astype(cfg.compute_dtype))
    cos, sin = rope_tables(cfg, positions_BT)
    x, new_kv = self.layers(x, cos, sin, mask, cache, cache_index)
    return rms_norm(x, self.final_norm.get_value(), cfg.rms_norm_eps), new_kv

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for `decode`: keys/values [L, B, S, K, H] and key segment ids [B, S]."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return dict(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype),
                segment_ids=jnp.zeros((batch, max_len), jnp.int32))

  def decode(self, input_ids_BT: Array, positions_BT: Array, segment_ids_BT: Array,
             cache: dict, cache_index: Array) -> tuple[Array, dict]:
    """Runs T new tokens written at cache slots [cache_index, cache_index + T).

    Each new token attends causally (by slot) to every earlier non-padding slot. Used for a
    prompt chunk (T = prompt length) and then one token at a time. Returns (hidden, new cache).
    """
    T = input_ids_BT.shape[1]
    key_seg = jax.lax.dynamic_update_slice_in_dim(cache['segment_ids'], segment_ids_BT,
                                                  cache_index, 1)
    S = key_seg.shape[1]
    q_slot = cache_index + jnp.arange(T)
    causal = jnp.arange(S)[None, :] <= q_slot[:, None]  # [T, S]
    mask = causal[None] & (key_seg[:, None, :] != 0) & (segment_ids_BT[:, :, None] != 0)
    hidden, (k, v) = self._forward(input_ids_BT, positions_BT, mask, cache, cache_index)
    return hidden, dict(k=k, v=v, segment_ids=key_seg)
