"""AdamW schedule, weight-decay mask, clipping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from isdaa_jax import defaults
from isdaa_jax.model.llama import Llama, LlamaConfig
from isdaa_jax.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def _opt(**kw):
  o = defaults.optimizer_config()
  for k, v in kw.items():
    o[k] = v
  return o


def test_schedule_warms_up_linearly_then_decays_to_the_minimum_ratio():
  sched = learning_rate_schedule(_opt(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1),
                                 num_steps=100)
  lr = np.asarray([float(sched(s)) for s in range(101)])
  assert lr[0] == 0.0
  np.testing.assert_allclose(lr[:11], np.linspace(0.0, 1e-3, 11), rtol=1e-6)
  assert lr[10] == pytest.approx(1e-3)
  assert np.all(np.diff(lr[10:]) < 0)  # strictly decreasing after the peak
  assert lr[100] == pytest.approx(1e-4, rel=1e-6)
  # Cosine: half-way through the decay the rate is midway between peak and floor.
  assert lr[55] == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-5)


def test_schedule_without_warmup_starts_at_peak_and_short_runs_still_train():
  assert float(learning_rate_schedule(_opt(learning_rate=2e-4, warmup_steps=0), 50)(0)) == \
      pytest.approx(2e-4)
  # Warmup longer than the run: clipped so the last step still has a positive rate.
  sched = learning_rate_schedule(_opt(learning_rate=1e-3, warmup_steps=100), num_steps=5)
  assert float(sched(4)) == pytest.approx(1e-3)


def _llama_params(scan_layers):
  cfg = LlamaConfig.from_model_config(defaults.model_config())
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_decay_mask_spares_norms_and_vectors_including_layer_stacked_ones(scan_layers):
  mask = decay_mask(_llama_params(scan_layers))
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  spared = {k for k, v in flat.items() if not v}
  # Norm weights are [D] or, stacked over layers, [L, D]: both are spared.
  assert spared == {"['final_norm']", "['layers']['attn_norm']", "['layers']['mlp_norm']"}
  assert flat["['embed']"] and flat["['layers']['wq']"] and flat["['layers']['w_down']"]


def test_decay_mask_on_plain_trees_spares_biases():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones((4,))}, 'scale': jnp.ones(())}
  assert decay_mask(params) == {'dense': {'kernel': True, 'bias': False}, 'scale': False}


def test_weight_decay_reaches_only_masked_parameters():
  params = {'w': jnp.full((2, 3), 2.0), 'norm': jnp.full((3,), 2.0), 'b': jnp.full((3,), 2.0)}
  tx = make_optimizer(_opt(learning_rate=0.1, warmup_steps=0, weight_decay=0.5), num_steps=10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradient: Adam's part is 0, decoupled decay is -lr * wd * p on matrices only.
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates['norm'], 0.0)
  np.testing.assert_array_equal(updates['b'], 0.0)


def test_global_norm_clipping_scales_gradients_before_adam():
  params = {'a': jnp.zeros((4,)), 'b': jnp.zeros((2, 2))}
  grads = {'a': jnp.full((4,), 3.0), 'b': jnp.full((2, 2), 4.0)}  # global norm 10
  assert float(optax.global_norm(grads)) == pytest.approx(10.0)
  tx = make_optimizer(_opt(grad_clip_norm=1.0, warmup_steps=0), num_steps=10)
  _, state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(state, 'mu')
  b1 = defaults.optimizer_config().b1
  # Adam's first moment after one step is (1 - b1) * the clipped gradient (norm 1).
  for k in grads:
    np.testing.assert_allclose(mu[k], (1 - b1) * grads[k] / 10.0, rtol=1e-6)
  no_clip = make_optimizer(_opt(grad_clip_norm=0.0, warmup_steps=0), num_steps=10)
  _, state = no_clip.update(grads, no_clip.init(params), params)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, 'mu')['a'], (1 - b1) * 3.0,
                             rtol=1e-6)
