"""The Llama decoder: causality, masking, remat/scan/attention equivalence, dtypes, KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from isdaa_jax.model import attention
from isdaa_jax.model.llama import Llama, LlamaConfig

CFG = LlamaConfig.tiny(vocab_size=97)


def _inputs(b=2, t=12, seed=0, vocab=97):
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  return ids, pos, seg


def _model(cfg=CFG, seed=0):
  return Llama(cfg, rngs=nnx.Rngs(seed))


def _same_params(src, cfg):
  """A model with cfg's execution policy and src's parameters."""
  dst = _model(cfg)
  nnx.update(dst, nnx.state(src))
  return dst


@pytest.mark.parametrize('name,expected', [
    ('llama3.2-1b', 1_235_814_400),
    ('llama3.2-3b', 3_212_749_824),
    ('llama3.1-8b', 8_030_261_248),
    ('llama3.1-70b', 70_553_706_496),
])
def test_preset_parameter_counts_match_published_sizes(name, expected):
  cfg = LlamaConfig.preset(name)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  assert count == expected == cfg.num_params()


def test_causal_outputs_ignore_future_tokens():
  model = _model()
  t = 12
  ids = jnp.arange(10, 10 + t, dtype=jnp.int32)[None]  # distinct tokens: one embedding row each
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32)

  def out_at(m, i):
    return m(ids, pos, seg)[0, i].sum()

  g_embed = nnx.grad(out_at)(model, 5).embed.get_value()  # [V, D]
  rows = jnp.abs(g_embed[10:10 + t]).max(axis=-1)
  assert float(rows[6:].max()) == 0.0  # tokens after position 5
  assert float(rows[:6].min()) > 0.0


def test_padding_and_segment_layout_do_not_change_real_tokens():
  model = _model()
  ids, pos, seg = _inputs(b=1, t=8)
  ref = model(ids, pos, seg)
  # Right padding with garbage tokens.
  ids_p = jnp.concatenate([ids, jnp.full((1, 5), 42, jnp.int32)], 1)
  pos_p = jnp.concatenate([pos, jnp.zeros((1, 5), jnp.int32)], 1)
  seg_p = jnp.concatenate([seg, jnp.zeros((1, 5), jnp.int32)], 1)
  np.testing.assert_allclose(model(ids_p, pos_p, seg_p)[:, :8], ref, atol=1e-5)
  # Packed after another sequence (segment 2, positions restarting at 0).
  other, opos, _ = _inputs(b=1, t=6, seed=3)
  packed = model(jnp.concatenate([other, ids], 1), jnp.concatenate([opos, pos], 1),
                 jnp.concatenate([jnp.ones((1, 6), jnp.int32), 2 * seg], 1))
  np.testing.assert_allclose(packed[:, 6:], ref, atol=1e-5)


@pytest.mark.parametrize('policy', [dict(remat='full'), dict(remat='dots'),
                                    dict(scan_layers=True), dict(scan_layers=True, remat='full'),
                                    dict(attention='blocked')])
def test_execution_policies_give_identical_outputs_and_grads(policy):
  model = _model()
  other = _same_params(model, dataclasses.replace(CFG, **policy))
  ids, pos, seg = _inputs(t=150 if policy.get('attention') else 12)  # > one key block

  def loss(m):
    return jnp.sum(jnp.sin(m(ids, pos, seg)))

  np.testing.assert_allclose(other(ids, pos, seg), model(ids, pos, seg), atol=2e-5)
  g_ref = nnx.grad(loss)(model)
  g_new = nnx.grad(loss)(other)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
    # Float32 sums in another order (blocked softmax, scan): tolerance relative to the largest.
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(a))) + 1e-6, rtol=1e-4)


def test_bfloat16_compute_close_to_float32():
  model = _model()
  bf16 = _same_params(model, dataclasses.replace(CFG, dtype='bfloat16'))
  ids, pos, seg = _inputs()
  h32 = model(ids, pos, seg)
  h16 = bf16(ids, pos, seg)
  assert h16.dtype == jnp.bfloat16
  # bfloat16 has 8 mantissa bits: ~1% relative error per op; final-norm outputs are O(1).
  err = float(jnp.max(jnp.abs(h16.astype(jnp.float32) - h32)))
  assert err < 0.1, err
  assert float(jnp.mean(jnp.abs(h16.astype(jnp.float32) - h32))) < 0.02


def test_kv_cache_decoding_matches_full_forward():
  model = _model()
  b, p, n = 2, 5, 6
  ids, _, _ = _inputs(b=b, t=p + n)
  # Row 1 has a shorter prompt, left-padded by two slots.
  seg = jnp.ones((b, p + n), jnp.int32).at[1, :2].set(0)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  full = model(ids, pos, seg)
  cache = model.init_cache(b, p + n)
  h, cache = model.decode(ids[:, :p], pos[:, :p], seg[:, :p], cache, 0)
  outs = [h]
  for i in range(p, p + n):
    h, cache = model.decode(ids[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache, i)
    outs.append(h)
  cached = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(cached[0], full[0], atol=2e-5)
  np.testing.assert_allclose(cached[1, 2:], full[1, 2:], atol=2e-5)


def test_scanned_cache_decoding_matches_unrolled():
  model = _model()
  scanned = _same_params(model, dataclasses.replace(CFG, scan_layers=True))
  ids, pos, seg = _inputs(b=1, t=4)
  h1, c1 = model.decode(ids, pos, seg, model.init_cache(1, 8), 0)
  h2, c2 = scanned.decode(ids, pos, seg, scanned.init_cache(1, 8), 0)
  np.testing.assert_allclose(h1, h2, atol=1e-5)
  np.testing.assert_allclose(c1['k'], c2['k'], atol=1e-5)


def test_from_model_config_reads_every_architecture_field():
  mc = base.model_config()
  mc.rope_scaling.rope_type = 'llama3'
  cfg = LlamaConfig.from_model_config(mc)
  assert cfg.vocab_size == mc.vocab_size and cfg.num_kv_heads == mc.num_kv_heads
  assert cfg.rope_scaling['factor'] == mc.rope_scaling.factor
  mc.preset = 'llama3.1-8b'
  assert LlamaConfig.from_model_config(mc).hidden_size == 4096


def test_attention_mask_helper():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = attention.segment_causal_mask(seg)[0]
  assert bool(m[1, 0]) and not bool(m[0, 1])  # causal
  assert not bool(m[2, 1])  # other segment
  assert not bool(m[4, 4]) and not bool(m[3, 4])  # padding is never a key


def test_cudnn_attention_refuses_cpu():
  with pytest.raises(ValueError, match='needs a GPU'):
    m = _model(dataclasses.replace(CFG, attention='cudnn'))
    m(*_inputs())
