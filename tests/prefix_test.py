"""Prefix-shared rows: layout, mask, log-probs and gradients equal to the two-row layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_test
from isdaa_jax import config as config_lib
from isdaa_jax import defaults, sharding
from isdaa_jax import layout as layout_lib
from isdaa_jax.data import collate, pipeline, prefix
from isdaa_jax.model import pair_logps
from isdaa_jax.model.llama import Llama, LlamaConfig

VOCAB = 64


def _pairs(n, seed=0, empty_rejected=False):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    prompt = [1] + rng.integers(3, VOCAB, rng.integers(0, 9)).tolist()
    rejected = rng.integers(3, VOCAB, rng.integers(0, 7)).tolist() + [2]
    out.append(dict(prompt_ids=prompt,
                    chosen_ids=rng.integers(3, VOCAB, rng.integers(0, 7)).tolist() + [2],
                    rejected_ids=[] if (empty_rejected and i == 1) else rejected))
  return out


def test_row_layout_by_hand():
  pair = dict(prompt_ids=[1, 5, 6], chosen_ids=[7, 2], rejected_ids=[8, 9, 2],
              reference_chosen_logps=-1.0, reference_rejected_logps=-2.0)
  b = prefix.collate_shared([pair], 10)
  row = {k: v[0] for k, v in b.items()}
  np.testing.assert_array_equal(row['shared_input_ids'], [1, 5, 6, 7, 2, 8, 9, 2, 0, 0])
  np.testing.assert_array_equal(row['shared_positions'], [0, 1, 2, 3, 4, 3, 4, 5, 0, 0])
  np.testing.assert_array_equal(row['shared_segment_ids'], [1, 1, 1, 2, 2, 3, 3, 3, 0, 0])
  np.testing.assert_array_equal(row['shared_targets'], [5, 6, 7, 2, 0, 9, 2, 0, 0, 0])
  np.testing.assert_array_equal(row['shared_chosen_mask'], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(row['shared_rejected_mask'], [0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
  assert (row['shared_prompt_last'], row['shared_rejected_first'],
          row['shared_rejected_first_mask']) == (2, 8, 1)
  assert row['reference_chosen_logps'] == -1.0 and row['reference_rejected_logps'] == -2.0
  assert prefix.shared_length(pair) == 8
  with pytest.raises(ValueError, match='does not fit'):
    prefix.collate_shared([pair], 7)
  assert prefix.shared_buckets((128, 512)) == (128, 256, 512, 1024)


def test_mask_hides_chosen_from_rejected_and_responses_from_the_prompt():
  seg = jnp.asarray([[1, 1, 2, 2, 3, 3, 0]])
  m = np.asarray(pair_logps.shared_attention_mask(seg))[0]
  expected = np.array([
      # keys: p  p  c  c  r  r  pad
      [1, 0, 0, 0, 0, 0, 0],  # prompt
      [1, 1, 0, 0, 0, 0, 0],  # prompt
      [1, 1, 1, 0, 0, 0, 0],  # chosen
      [1, 1, 1, 1, 0, 0, 0],  # chosen
      [1, 1, 0, 0, 1, 0, 0],  # rejected: the prompt and itself, never the chosen tokens
      [1, 1, 0, 0, 1, 1, 0],  # rejected
      [1, 1, 0, 0, 0, 0, 0],  # padding sees the prompt only (no fully masked row)
  ], bool)
  np.testing.assert_array_equal(m, expected)


def _model(**kw):
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False, **kw)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  return nnx.split(model)


@pytest.mark.parametrize('attention,chunk', [('xla', 4), ('blocked', 0)])
def test_logps_and_gradients_equal_the_two_row_layout(attention, chunk):
  graphdef, params = _model(attention=attention)
  pairs = _pairs(6, empty_rejected=True)
  unshared = collate.collate_pairs(pairs, 16)
  shared = prefix.collate_shared(pairs, 24)
  assert 'shared_input_ids' in shared and 'shared_input_ids' not in unshared

  def objective(p, batch, layout):
    lp_w, lp_l, n_w, n_l = layout.sequence_logps(nnx.merge(graphdef, p), batch, chunk)
    # Weights that differ per side and pair, so each log-prob's gradient is checked.
    w = jnp.arange(1.0, len(pairs) + 1)
    return jnp.sum(w * lp_w - 0.5 * w * lp_l), (lp_w, lp_l, n_w, n_l)

  grad = jax.jit(jax.grad(objective, has_aux=True), static_argnums=2)
  g_u, out_u = grad(params, unshared, layout_lib.Padded((16,)))
  g_s, out_s = grad(params, shared, layout_lib.PrefixShared((16,)))
  for name, a, b in zip(('lp_w', 'lp_l', 'n_w', 'n_l'), out_u, out_s):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
  assert float(out_s[3][1]) == 0.0  # the empty rejected response
  for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(g_s)):
    # Float32 summation order differs between the layouts: tolerance relative to the leaf's scale.
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())


def _config(**kw):
  cfg = defaults.get_config()
  m = cfg.model
  m.vocab_size, m.hidden_size, m.intermediate_size = VOCAB, 32, 64
  m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 2, 4, 2, 8
  m.logprob_chunk_size = 8
  cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 1e-2, 0
  cfg.train.num_steps = 10
  return config_lib.apply_overrides(cfg, kw)


def _train(cfg, batch, steps=2):
  h = train_test.Harness(cfg, sharding.make_mesh(defaults.mesh_config(),
                                                 devices=jax.devices()[:1]))
  return [h.step(batch) for _ in range(steps)]


def test_train_step_with_shared_rows_matches_two_rows_and_counts_fewer_tokens():
  pairs = _pairs(8, seed=1)
  cfg = _config(**{'optimizer.grad_accum_steps': 2})
  unshared = _train(cfg, collate.collate_pairs(pairs, 16))
  cfg.data.prefix_sharing = True
  shared = _train(cfg, prefix.collate_shared(pairs, 32))
  for a, b in zip(unshared, shared):
    for key in ('loss', 'grad_norm', 'rewards/margins', 'logps/rejected'):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
  assert shared[0]['tokens'] == sum(prefix.shared_length(p) for p in pairs)
  assert unshared[0]['tokens'] - shared[0]['tokens'] == sum(len(p['prompt_ids']) for p in pairs)


def _pairs_of(batch):
  """The tokenized pairs of an unshared batch, read back from its layout."""
  out = []
  for r in range(batch['chosen_input_ids'].shape[0]):
    p = int(np.argmax(batch['chosen_loss_mask'][r])) + 1
    sides = {s: batch[f'{s}_input_ids'][r][:batch[f'{s}_segment_ids'][r].sum()]
             for s in collate.SIDES}
    out.append(dict(prompt_ids=sides['chosen'][:p], chosen_ids=sides['chosen'][p:],
                    rejected_ids=sides['rejected'][p:]))
  return out


def test_pipeline_emits_shared_rows_of_one_global_length_per_batch():
  store = pipeline.PairStore(_pairs(32, seed=2))
  data = defaults.data_config()
  data.batch_size, data.length_buckets = 8, (8, 16)
  plain = list(pipeline.train_iterator(store, data, layout_lib.from_config(data)))
  data.prefix_sharing = True
  halves = [list(pipeline.train_iterator(store, data, layout_lib.from_config(data), process_index=i, process_count=2))
            for i in (0, 1)]
  assert len(plain) == len(halves[0]) == 4
  for batch, h0, h1 in zip(plain, *halves):
    seq_len = h0['shared_input_ids'].shape[1]
    assert h1['shared_input_ids'].shape[1] == seq_len and seq_len in (8, 16, 32)
    pairs = _pairs_of(batch)
    assert seq_len == min(b for b in (8, 16, 32) if b >= max(map(prefix.shared_length, pairs)))
    expected = prefix.collate_shared(pairs, seq_len)
    for key, value in expected.items():
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), value, err_msg=key)
