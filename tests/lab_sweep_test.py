"""The vectorized lab sweep: one run of a vectorized group equals the same run trained alone
through `train.setup`'s jitted step, with and without the importance weight."""

import copy

import jax
import numpy as np
from flax import nnx

from isdaa_jax import policy as policy_lib, sharding, train
from isdaa_jax.lab import defaults as lab_defaults
from isdaa_jax.lab import preferences, sweep


def _config(tmp_path, method):
  cfg = lab_defaults.get_config('quick')
  m = cfg.model
  m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = (
      16, 32, 1, 2, 1, 8)
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(32):
    rows.append(dict(prompt_ids=[1, 3] + rng.integers(7, 23, 3).tolist(),
                     chosen_ids=rng.integers(7, 23, rng.integers(2, 8)).tolist() + [2],
                     rejected_ids=rng.integers(7, 23, rng.integers(2, 8)).tolist() + [2],
                     reference_chosen_logps=float(-rng.uniform(5, 20)),
                     reference_rejected_logps=float(-rng.uniform(5, 20))))
  preferences.write_jsonl(rows, tmp_path / 'pairs.jsonl')
  cfg.data.path = str(tmp_path / 'pairs.jsonl')
  cfg.data.batch_size = 8
  cfg.train.num_steps = 3
  cfg.loss.name = method
  return cfg


def _alone(cfg, params, batches, run: sweep.Run):
  cfg = copy.deepcopy(cfg)
  cfg.loss.beta, cfg.loss.importance.enabled = run.beta, run.importance
  run_setup = train.setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = run_setup.init_state(jax.tree.map(np.array, params))
  for batch in batches[run.seed]:
    state, metrics = run_setup.train_step(state, {}, batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_a_vectorized_run_equals_the_same_run_alone(tmp_path):
  for method, runs in (('dpo', [sweep.Run(0.1, False, 0), sweep.Run(0.5, True, 1)]),
                       ('alphapo', [sweep.Run(2.5, True, 0)])):
    cfg = _config(tmp_path, method)
    group = sweep.Group(cfg, runs, dict(method=method, variant=''))
    _, _, _, params = policy_lib.build_policy(cfg.model, sharding.make_mesh(
        cfg.mesh, jax.devices()[:1]), 0)
    params = jax.device_get(params)
    batches = sweep.seed_batches(cfg, (0, 1), 3)
    # Different seeds, different data order.
    assert not np.array_equal(batches[0][0]['chosen_input_ids'], batches[1][0]['chosen_input_ids'])
    run_setup = sweep.setup(cfg)
    step = sweep.vectorized_step(run_setup)
    arrays = sweep.run_arrays(group)
    state = sweep.init_state(run_setup, params, len(runs))
    for i in range(3):
      batch = {k: np.stack([batches[r.seed][i][k] for r in runs]) for k in batches[0][i]}
      state, metrics = step(state, batch, arrays['beta'], arrays['eps'], arrays['min_log_weight'])
    vec_params, metrics = jax.device_get((state.params, metrics))
    for r, run in enumerate(runs):
      alone_params, alone_metrics = _alone(cfg, params, batches, run)
      jax.tree.map(lambda v, a: np.testing.assert_allclose(v[r], a, rtol=2e-5, atol=2e-6),
                   vec_params, alone_params)
      for k in ('loss', 'grad_norm', 'rewards/chosen', 'is/weight_mean'):
        np.testing.assert_allclose(metrics[k][r], alone_metrics[k], rtol=2e-5, atol=1e-6)
      # The weight is exactly 1 without it and moved away from 1 with it.
      assert (metrics['is/weight_mean'][r] == 1.0) == (not run.importance)
    # The runs did move, and differently.
    moved = jax.tree.leaves(jax.tree.map(lambda v, p: np.abs(v - p).max(axis=tuple(
        range(1, v.ndim))), vec_params, params))
    assert all(np.all(m > 0) for m in moved)
