"""The Llama decoder: sizes, causality, masking, RoPE, remat/scan/attention equivalence, dtypes,
KV cache. Every model call is jitted: eager op-by-op dispatch is what makes tiny-model tests slow.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isdaa_jax import defaults
from isdaa_jax.model import attention
from isdaa_jax.model import llama
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


@nnx.jit
def _forward(model, ids, pos, seg, mask=None):
  return model(ids, pos, seg, attention_mask_BTT=mask)


@nnx.jit
def _decode(model, ids, pos, seg, cache, index):
  return model.decode(ids, pos, seg, cache, index)


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


def test_presets_take_overrides_and_unknown_names_fail():
  assert LlamaConfig.preset('llama3.1-8b', num_layers=2).num_layers == 2
  assert LlamaConfig.preset('llama3.1-8b').hidden_size == 4096
  assert LlamaConfig.tiny(vocab_size=10).vocab_size == 10
  with pytest.raises(ValueError, match='unknown model preset'):
    LlamaConfig.preset('llama2-7b')


def test_causal_outputs_ignore_future_tokens():
  model = _model()
  t = 12
  ids = jnp.arange(10, 10 + t, dtype=jnp.int32)[None]  # distinct tokens: one embedding row each
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32)

  @nnx.jit
  def grad_of_position_5(m):
    return nnx.grad(lambda m: m(ids, pos, seg)[0, 5].sum())(m)

  g_embed = grad_of_position_5(model).embed.get_value()  # [V, D]
  rows = jnp.abs(g_embed[10:10 + t]).max(axis=-1)
  assert float(rows[6:].max()) == 0.0  # tokens after position 5
  assert float(rows[:6].min()) > 0.0


def test_padding_and_segment_layout_do_not_change_real_tokens():
  model = _model()
  ids, pos, seg = _inputs(b=1, t=8)
  ref = _forward(model, ids, pos, seg)
  # Right padding with garbage tokens.
  ids_p = jnp.concatenate([ids, jnp.full((1, 5), 42, jnp.int32)], 1)
  pos_p = jnp.concatenate([pos, jnp.zeros((1, 5), jnp.int32)], 1)
  seg_p = jnp.concatenate([seg, jnp.zeros((1, 5), jnp.int32)], 1)
  np.testing.assert_allclose(_forward(model, ids_p, pos_p, seg_p)[:, :8], ref, atol=1e-5)
  # Packed after another sequence (segment 2, positions restarting at 0).
  other, opos, _ = _inputs(b=1, t=5, seed=3)
  packed = _forward(model, jnp.concatenate([other, ids], 1), jnp.concatenate([opos, pos], 1),
                    jnp.concatenate([jnp.ones((1, 5), jnp.int32), 2 * seg], 1))
  np.testing.assert_allclose(packed[:, 5:], ref, atol=1e-5)


def test_explicit_mask_supports_a_shared_prompt():
  """One row [prompt, chosen, rejected] with rejected seeing only the prompt equals two rows."""
  model = _model()
  p, c, r = 5, 4, 3
  ids, _, _ = _inputs(b=1, t=p + c + r, seed=5)
  seg = jnp.array([[1] * p + [2] * c + [3] * r], jnp.int32)
  pos = jnp.array([list(range(p + c)) + list(range(p, p + r))], jnp.int32)
  causal = jnp.tril(jnp.ones((p + c + r,) * 2, bool))
  mask = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 1))
  shared = _forward(model, ids, pos, seg, mask)
  # The default mask, passed explicitly, changes nothing.
  default = attention.segment_causal_mask(seg)
  np.testing.assert_array_equal(_forward(model, ids, pos, seg, default),
                                _forward(model, ids, pos, seg))
  chosen_row = _forward(model, ids[:, :p + c], pos[:, :p + c], jnp.ones((1, p + c), jnp.int32))
  rejected_ids = jnp.concatenate([ids[:, :p], ids[:, p + c:]], 1)
  rejected_row = _forward(model, rejected_ids, jnp.arange(p + r)[None],
                          jnp.ones((1, p + r), jnp.int32))
  np.testing.assert_allclose(shared[:, :p + c], chosen_row, atol=1e-5)
  np.testing.assert_allclose(shared[:, p + c:], rejected_row[:, p:], atol=1e-5)


def test_rope_rotates_half_pairs_and_depends_only_on_relative_position():
  cfg = LlamaConfig.tiny()
  dh = cfg.head_dim
  inv = llama.rope_inv_freq(cfg)
  # HF layout: dimension i rotates with dimension i + Dh/2 (rotate_half), not with i + 1.
  e0 = jnp.zeros((1, 1, 1, dh)).at[..., 1].set(1.0)
  cos, sin = llama.rope_tables(cfg, jnp.array([[3]]))
  out = llama.apply_rope(e0, cos, sin)[0, 0, 0]
  np.testing.assert_allclose(out[1], math.cos(3 * float(inv[1])), rtol=1e-6)
  np.testing.assert_allclose(out[1 + dh // 2], math.sin(3 * float(inv[1])), rtol=1e-6)
  assert float(jnp.abs(out.at[1].set(0).at[1 + dh // 2].set(0)).max()) == 0.0
  # <rope(q, i), rope(k, j)> depends on i - j only.
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, dh)), jnp.float32) for _ in range(2))

  def score(i, j):
    ci, si = llama.rope_tables(cfg, jnp.array([[i]]))
    cj, sj = llama.rope_tables(cfg, jnp.array([[j]]))
    return float(jnp.sum(llama.apply_rope(q, ci, si) * llama.apply_rope(k, cj, sj)))

  np.testing.assert_allclose(score(7, 2), score(105, 100), rtol=1e-4)
  assert abs(score(7, 2) - score(7, 3)) > 1e-3


def test_llama3_rope_scaling_bands():
  """transformers' _compute_llama3_parameters: keep short wavelengths, divide long ones by
  `factor`, interpolate in between."""
  scaling = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64)
  plain = LlamaConfig.tiny(rope_theta=10000.0)
  inv = np.asarray(llama.rope_inv_freq(plain))
  scaled = np.asarray(llama.rope_inv_freq(dataclasses.replace(plain, rope_scaling=scaling)))
  wavelen = 2 * np.pi / inv  # head_dim 16: 6.3 (< 64/4), 19.9 and 62.8 (medium), then > 64
  np.testing.assert_array_equal(scaled[wavelen < 16], inv[wavelen < 16])
  np.testing.assert_allclose(scaled[wavelen > 64], inv[wavelen > 64] / 8, rtol=1e-6)
  medium = (wavelen >= 16) & (wavelen <= 64)
  assert medium.sum() == 2
  assert np.all((scaled[medium] > inv[medium] / 8) & (scaled[medium] < inv[medium]))
  # Wavelength 19.87: smooth = (64 / 19.87 - 1) / (4 - 1) = 0.7404.
  smooth = (64 / wavelen[1] - 1) / 3
  np.testing.assert_allclose(scaled[1], (1 - smooth) * inv[1] / 8 + smooth * inv[1], rtol=1e-6)
  np.testing.assert_allclose(scaled[1], 0.2443846, rtol=1e-6)
  with pytest.raises(ValueError, match='not supported'):
    llama.rope_inv_freq(dataclasses.replace(plain, rope_scaling=dict(scaling, rope_type='yarn')))


@nnx.jit
def _out_and_grad(model, ids, pos, seg):
  loss = lambda m: jnp.sum(jnp.sin(m(ids, pos, seg)))
  return model(ids, pos, seg), nnx.grad(loss)(model)


@pytest.mark.parametrize('policy', [
    dict(remat='full'), dict(remat='dots'), dict(scan_layers=True), dict(attention='blocked'),
    dict(scan_layers=True, remat='dots', attention='blocked')])
def test_execution_policies_give_identical_outputs_and_grads(policy):
  model = _model()
  other = _same_params(model, dataclasses.replace(CFG, **policy))
  ids, pos, seg = _inputs(t=150 if 'attention' in policy else 12)  # > one key block
  seg = seg.at[1, -7:].set(0)  # some right padding

  h_ref, g_ref = _out_and_grad(model, ids, pos, seg)  # compiled once for all policies
  h_new, g_new = _out_and_grad(other, ids, pos, seg)
  np.testing.assert_allclose(h_new, h_ref, atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
    # Float32 sums in another order (blocked softmax, scan): tolerance relative to the largest.
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(a))) + 1e-6, rtol=1e-4)


def test_bfloat16_compute_close_to_float32():
  model = _model()
  bf16 = _same_params(model, dataclasses.replace(CFG, dtype='bfloat16'))
  ids, pos, seg = _inputs()
  h32 = _forward(model, ids, pos, seg)
  h16 = _forward(bf16, ids, pos, seg)
  assert h16.dtype == jnp.bfloat16
  # Tolerance: bfloat16 keeps 8 mantissa bits (~0.4% relative per rounding) and the final-norm
  # outputs are O(1), so a 2-layer model stays within 0.1 absolute and 0.02 on average.
  err = jnp.abs(h16.astype(jnp.float32) - h32)
  assert float(err.max()) < 0.1, float(err.max())
  assert float(err.mean()) < 0.02, float(err.mean())


def test_bfloat16_parameters_are_stored_in_bfloat16():
  model = _model(dataclasses.replace(CFG, param_dtype='bfloat16'))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
  ids, pos, seg = _inputs()
  assert _forward(model, ids, pos, seg).dtype == jnp.float32  # compute dtype stays float32


@pytest.mark.parametrize('scan', [False, True])
def test_kv_cache_decoding_matches_full_forward(scan):
  model = _model(dataclasses.replace(CFG, scan_layers=scan))
  b, p, n = 2, 5, 6
  ids, _, _ = _inputs(b=b, t=p + n)
  # Row 1 has a shorter prompt, left-padded by two slots.
  seg = jnp.ones((b, p + n), jnp.int32).at[1, :2].set(0)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  full = _forward(model, ids, pos, seg)
  cache = model.init_cache(b, p + n + 3)  # spare slots stay empty and unseen
  h, cache = _decode(model, ids[:, :p], pos[:, :p], seg[:, :p], cache, 0)
  outs = [h]
  for i in range(p, p + n):  # the slot index is traced: one compilation for every step
    h, cache = _decode(model, ids[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache,
                       jnp.int32(i))
    outs.append(h)
  cached = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(cached[0], full[0], atol=2e-5)
  np.testing.assert_allclose(cached[1, 2:], full[1, 2:], atol=2e-5)
  assert cache['k'].shape == (CFG.num_layers, b, p + n + 3, CFG.num_kv_heads, CFG.head_dim)
  np.testing.assert_array_equal(cache['segment_ids'][:, p + n:], 0)


def test_from_model_config_reads_every_architecture_field():
  mc = defaults.model_config()
  mc.rope_scaling.rope_type = 'llama3'
  mc.remat, mc.scan_layers, mc.attention = 'dots', True, 'blocked'
  cfg = LlamaConfig.from_model_config(mc)
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
              'num_kv_heads', 'head_dim', 'rope_theta', 'rms_norm_eps', 'tie_word_embeddings',
              'max_position_embeddings', 'param_dtype', 'dtype', 'remat', 'scan_layers',
              'attention'):
    assert getattr(cfg, key) == mc[key], key
  assert cfg.rope_scaling == dict(mc.rope_scaling)
  mc.rope_scaling.rope_type = ''
  assert LlamaConfig.from_model_config(mc).rope_scaling is None
  mc.preset = 'llama3.1-8b'
  preset = LlamaConfig.from_model_config(mc)
  assert preset.hidden_size == 4096 and preset.remat == 'dots'


def test_untied_model_has_a_separate_head():
  cfg = dataclasses.replace(CFG, tie_word_embeddings=False)
  model = _model(cfg)
  assert model.unembedding().shape == (CFG.hidden_size, CFG.vocab_size)
  assert not np.array_equal(model.unembedding(), model.embed.get_value().T)
  tied = _model()
  np.testing.assert_array_equal(tied.unembedding(), tied.embed.get_value().T)
  assert 'lm_head' not in nnx.state(tied)
