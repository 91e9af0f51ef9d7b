"""Packed rows: layout, mask; log-probs, gradients and train steps equal to the padded layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefix_test
import train_test
from isdaa_jax import config as config_lib
from isdaa_jax import defaults, train
from isdaa_jax import layout as layout_lib
from isdaa_jax.data import collate, packing, pipeline, prefix
from isdaa_jax.model import pair_logps


def test_unshared_layout_by_hand():
  a = dict(prompt_ids=[1, 5], chosen_ids=[7, 2], rejected_ids=[8, 2], reference_chosen_logps=-1.0,
           reference_rejected_logps=-2.0)
  b = dict(prompt_ids=[1], chosen_ids=[6, 6, 2], rejected_ids=[2], reference_chosen_logps=-3.0,
           reference_rejected_logps=-4.0)
  batch = packing.collate_packed([a, b], 10, shared=False)
  g = 2  # "no pair"
  # First fit, longest first: a's two sequences and b's rejected share row 0; b's chosen row 1.
  rows = {k[len('packed_'):]: v for k, v in batch.items() if v.ndim == 2}
  np.testing.assert_array_equal(rows['input_ids'], [[1, 5, 7, 2, 1, 5, 8, 2, 1, 2],
                                                    [1, 6, 6, 2, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['positions'], [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1],
                                                    [0, 1, 2, 3, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['segment_ids'], [[1, 1, 1, 1, 2, 2, 2, 2, 3, 3],
                                                      [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['targets'], [[5, 7, 2, 0, 5, 8, 2, 0, 2, 0],
                                                  [6, 6, 2, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['roles'], [[2, 2, 2, 2, 3, 3, 3, 3, 3, 3],
                                                [2, 2, 2, 2, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['chosen_pair'], [[g, 0, 0, g, g, g, g, g, g, g],
                                                      [1, 1, 1, g, g, g, g, g, g, g]])
  np.testing.assert_array_equal(rows['rejected_pair'], [[g, g, g, g, g, 0, 0, g, 1, g],
                                                        [g, g, g, g, g, g, g, g, g, g]])
  np.testing.assert_array_equal(batch['packed_rejected_first_mask'], [0, 0])
  np.testing.assert_array_equal(batch['reference_rejected_logps'], [-2.0, -4.0])
  with pytest.raises(ValueError, match='does not fit config.data.pack_length=3'):
    packing.collate_packed([a, b], 3, shared=False)


def test_shared_layout_by_hand():
  a = dict(prompt_ids=[1, 5], chosen_ids=[7, 2], rejected_ids=[8, 2])
  b = dict(prompt_ids=[1], chosen_ids=[6, 2], rejected_ids=[9, 9, 2])
  batch = packing.collate_packed([a, b], 8, shared=True, row_multiple=4)
  assert batch['packed_input_ids'].shape == (4, 8)  # 2 rows needed, rounded up to the multiple
  np.testing.assert_array_equal(batch['packed_input_ids'][:2], [[1, 5, 7, 2, 8, 2, 0, 0],
                                                         [1, 6, 2, 9, 9, 2, 0, 0]])
  np.testing.assert_array_equal(batch['packed_roles'][:2], [[1, 1, 2, 2, 3, 3, 0, 0],
                                                            [1, 2, 2, 3, 3, 3, 0, 0]])
  np.testing.assert_array_equal(batch['packed_positions'][:2], [[0, 1, 2, 3, 2, 3, 0, 0],
                                                                [0, 1, 2, 1, 2, 3, 0, 0]])
  # l_0 comes from the last prompt token: flat index row * 8 + position.
  np.testing.assert_array_equal(batch['packed_rejected_first_index'], [1, 8])
  np.testing.assert_array_equal(batch['packed_rejected_first'], [8, 9])
  np.testing.assert_array_equal(batch['packed_rejected_first_mask'], [1, 1])
  assert not batch['packed_segment_ids'][2:].any()  # the rounding rows are all padding


def test_mask_is_the_per_unit_mask_on_the_diagonal_and_nothing_across_units():
  pairs = prefix_test._pairs(5, seed=3)
  for shared in (False, True):
    batch = packing.collate_packed(pairs, 40, shared=shared)
    seg, roles = batch['packed_segment_ids'], batch['packed_roles']
    mask = np.asarray(pair_logps.packed_attention_mask(jnp.asarray(seg), jnp.asarray(roles)))
    for r in range(seg.shape[0]):
      for s in range(1, seg[r].max() + 1):
        span = np.flatnonzero(seg[r] == s)
        inside = mask[r][np.ix_(span, span)]
        if shared:
          expected = np.asarray(pair_logps.shared_attention_mask(jnp.asarray(roles[r][span])[None]))[0]
        else:
          expected = np.tril(np.ones((len(span), len(span)), bool))
        np.testing.assert_array_equal(inside, expected)
        others = np.flatnonzero(seg[r] != s)
        assert not mask[r][np.ix_(span, others)].any()
      pad = np.flatnonzero(seg[r] == 0)
      assert mask[r][pad].sum(-1).min() >= 1  # no fully masked row


def test_packing_leaves_less_padding_than_buckets_on_varied_lengths():
  rng = np.random.default_rng(0)
  size = lambda low: int(rng.integers(low, 60))
  pairs = [dict(prompt_ids=[1] * size(4), chosen_ids=[3] * size(1), rejected_ids=[4] * size(1))
           for _ in range(64)]
  real = sum(len(p['prompt_ids']) * 2 + len(p['chosen_ids']) + len(p['rejected_ids'])
             for p in pairs)
  bucket = collate.bucket_for(max(map(collate.pair_length, pairs)), (64, 128))
  padded_tokens = 2 * len(pairs) * bucket
  packed = packing.collate_packed(pairs, 128, shared=False)
  assert int((packed['packed_segment_ids'] > 0).sum()) == real
  assert packed['packed_input_ids'].size < 0.8 * padded_tokens
  assert packed['packed_input_ids'].size < 1.1 * real  # first-fit leaves < 10% of each row empty here


def _grad_outputs(graphdef, params, batch, layout, chunk, micro):
  """Log-probs, counts and the gradient of a weighted sum of them, per micro-batch as the train
  step splits a batch, merged back into global pair order."""

  def objective(p, b):
    lp_w, lp_l, n_w, n_l = layout.sequence_logps(nnx.merge(graphdef, p), b, chunk)
    w = jnp.arange(1.0, lp_w.shape[0] + 1)  # differs per pair and side: every log-prob counts
    return jnp.sum(w * lp_w - 0.5 * w * lp_l), (lp_w, lp_l, n_w, n_l)

  grad = jax.jit(jax.grad(objective, has_aux=True))
  if micro == 1:
    return grad(params, batch)
  parts = train._split_micro(batch, micro)  # pylint: disable=protected-access
  grads, outs = [], []
  for i in range(micro):
    g, out = grad(params, jax.tree.map(lambda x, i=i: x[i], parts))
    grads.append(g)
    outs.append(out)
  outs = [train._merge_micro(jnp.stack(o)) for o in zip(*outs)]  # pylint: disable=protected-access
  return jax.tree.map(lambda *g: sum(g), *grads), outs


@pytest.mark.parametrize('shared,micro,attention,chunk', [
    (False, 1, 'xla', 8), (True, 1, 'xla', 8), (False, 2, 'blocked', 0), (True, 2, 'xla', 0)])
def test_logps_and_gradients_equal_the_padded_layout(shared, micro, attention, chunk):
  graphdef, params = prefix_test._model(attention=attention)
  pairs = prefix_test._pairs(8, seed=4, empty_rejected=True)
  padded = collate.collate_pairs(pairs, 16)
  packed = packing.collate_packed(pairs, 32, shared=shared, micro_batches=micro)
  # Both split into the same strided micro-batches, as the train step splits them.
  g_u, out_u = _grad_outputs(graphdef, params, padded, layout_lib.Padded((16,)), chunk, micro)
  g_p, out_p = _grad_outputs(graphdef, params, packed, layout_lib.Packed(32, shared), chunk,
                             micro)
  for name, a, b in zip(('lp_w', 'lp_l', 'n_w', 'n_l'), out_u, out_p):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(out_p[2], [len(p['chosen_ids']) for p in pairs])
  np.testing.assert_array_equal(out_p[3], [len(p['rejected_ids']) for p in pairs])
  for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(g_p)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize('shared', [False, True])
def test_train_step_packed_on_eight_devices_matches_padded_on_one(shared):
  pairs = train_test._pairs(16, seed=5)
  cfg = train_test._config(**{'optimizer.grad_accum_steps': 2, 'loss.importance.enabled': True})
  padded = train_test.Harness(cfg, train_test._mesh((1, 1, 1)))
  config_lib.apply_overrides(cfg, {'data.packing': True, 'data.pack_length': 40,
                                   'data.prefix_sharing': shared})
  packed = train_test.Harness(cfg, train_test._mesh((2, 2, 2)))
  # data * fsdp = 4 data-parallel devices: rows round up to a multiple of 4 per micro-batch.
  batch = packing.collate_packed(pairs, 40, shared=shared, micro_batches=2, row_multiple=4)
  assert batch['packed_input_ids'].shape[0] % 8 == 0
  for i in range(3):
    m_u, m_p = padded.step(collate.collate_pairs(pairs, 24)), packed.step(batch)
    for k in ('loss', 'grad_norm', 'rewards/margins', 'is/weight_mean', 'logps/rejected'):
      assert m_p[k] == pytest.approx(m_u[k], rel=2e-4, abs=1e-6), (i, k)
  expected_tokens = sum(
      prefix.shared_length(p) if shared
      else 2 * len(p['prompt_ids']) + len(p['chosen_ids']) + len(p['rejected_ids'])
      for p in pairs)
  assert m_p['tokens'] == expected_tokens
  for a, b in zip(jax.tree.leaves(padded.state.params), jax.tree.leaves(packed.state.params)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-3)


def test_pipeline_packs_the_global_batch_and_splits_it_over_processes():
  store = pipeline.PairStore(prefix_test._pairs(32, seed=6))
  data = defaults.data_config()
  data.batch_size, data.length_buckets, data.packing = 8, (8, 16), True
  assert layout_lib.pack_length(data) == 16
  data.prefix_sharing = True
  assert layout_lib.pack_length(data) == 32
  data.pack_length = 24
  whole = list(pipeline.train_iterator(store, data, layout_lib.from_config(data), micro_batches=2, row_multiple=2))
  halves = [list(pipeline.train_iterator(store, data, layout_lib.from_config(data), process_index=i, process_count=2,
                                         micro_batches=2, row_multiple=2)) for i in (0, 1)]
  data.packing, data.prefix_sharing = False, False
  plain = list(pipeline.train_iterator(store, data, layout_lib.from_config(data)))  # the same global batches, padded
  assert len(whole) == len(halves[0]) == len(plain) == 4
  for batch, h0, h1, padded in zip(whole, *halves, plain):
    pairs = prefix_test._pairs_of(padded)  # pylint: disable=protected-access
    expected = packing.collate_packed(pairs, 24, shared=True, micro_batches=2, row_multiple=2)
    for key, value in expected.items():
      np.testing.assert_array_equal(batch[key], value, err_msg=key)
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), value, err_msg=key)


def test_config_rejects_a_pack_length_shorter_than_a_unit():
  cfg = defaults.get_config()
  cfg.data.packing, cfg.data.pack_length = True, 300
  cfg.data.prefix_sharing = True
  with pytest.raises(config_lib.ConfigError, match='pack_length \\(300\\) must hold the longest'):
    config_lib.validate(cfg)
  cfg.data.prefix_sharing = False
  with pytest.raises(config_lib.ConfigError, match='config.data.max_length\\)'):
    config_lib.validate(cfg)
  cfg.data.pack_length = 512
  config_lib.validate(cfg)
