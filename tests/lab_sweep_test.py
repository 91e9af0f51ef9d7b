"""The vectorized lab sweep: runs of several losses trained as one vectorized program equal the
same runs trained alone through `train.setup`'s jitted step, with and without the weight."""

import copy

import jax
import jax.numpy as jnp
import numpy as np

from isdaa_jax import losses, policy as policy_lib, sharding, train
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


def test_vectorized_runs_of_several_losses_equal_the_same_runs_alone(tmp_path):
  # One program: DPO, IPO and AlphaPO runs (per-run loss choice, beta, alpha, gamma, weight on
  # or off) in one vectorized step.
  groups = []
  for method, runs in (('dpo', [sweep.Run(0.1, False, 0), sweep.Run(0.5, True, 1)]),
                       ('ipo', [sweep.Run(0.25, True, 0)]),
                       ('alphapo', [sweep.Run(2.5, True, 0), sweep.Run(1.0, False, 1)])):
    cfg = _config(tmp_path, method)
    if method == 'alphapo':
      cfg.loss.alpha, cfg.loss.gamma = 0.25, 0.1
    groups.append(sweep.Group(cfg, runs, dict(method=method, variant='')))
  assert len({sweep.program_key(g.config) for g in groups}) == 1
  cfg = groups[0].config
  _, _, _, params = policy_lib.build_policy(cfg.model, sharding.make_mesh(
      cfg.mesh, jax.devices()[:1]), 0)
  params = jax.device_get(params)
  batches = sweep.seed_batches(cfg, (0, 1), 3)
  # Different seeds, different data order.
  assert not np.array_equal(batches[0][0]['chosen_input_ids'], batches[1][0]['chosen_input_ids'])
  run_setup = sweep.setup(cfg)
  names = sweep.loss_names(groups)
  assert names == ('alphapo', 'dpo', 'ipo')
  step = sweep.vectorized_step(run_setup, names)
  arrays = sweep.run_arrays(groups)
  np.testing.assert_array_equal(arrays['name_index'], [1, 1, 2, 0, 0])
  np.testing.assert_array_equal(arrays['eps'], [0.0, 0.25, 0.25, 0.25, 0.0])
  flat = [(g, r) for g in groups for r in g.runs]
  state = sweep.init_state(run_setup, params, len(flat))
  for i in range(3):
    batch = {k: np.stack([batches[r.seed][i][k] for _, r in flat]) for k in batches[0][i]}
    state, metrics = step(state, batch, arrays)
  vec_params, metrics = jax.device_get((state.params, metrics))
  for r, (group, run) in enumerate(flat):
    alone_params, alone_metrics = _alone(group.config, params, batches, run)
    jax.tree.map(lambda v, a, r=r: np.testing.assert_allclose(v[r], a, rtol=2e-5, atol=2e-6),
                 vec_params, alone_params)
    for k in ('loss', 'grad_norm', 'rewards/chosen', 'is/weight_mean'):
      np.testing.assert_allclose(metrics[k][r], alone_metrics[k], rtol=2e-5, atol=1e-6)
    # The weight is exactly 1 without it and moved away from 1 with it.
    assert (metrics['is/weight_mean'][r] == 1.0) == (not run.importance)
  # The runs did move, and differently.
  moved = jax.tree.leaves(jax.tree.map(lambda v, p: np.abs(v - p).max(axis=tuple(
      range(1, v.ndim))), vec_params, params))
  assert all(np.all(m > 0) for m in moved)
  assert len({float(metrics['loss'][r]) for r in range(len(flat))}) == len(flat)


def test_chunks_are_equal_sized_and_cover_every_run():
  assert sweep.chunks(30, 48) == [slice(0, 30)]
  assert sweep.chunks(315, 48) == [slice(i * 45, (i + 1) * 45) for i in range(7)]
  # 50 runs in chunks of at most 48: two of 25, not 48 + 2.
  assert sweep.chunks(50, 48) == [slice(0, 25), slice(25, 50)]
  assert sweep.chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_program_key_separates_only_what_branches_in_python():
  base = lab_defaults.get_config('quick')
  other = copy.deepcopy(base)
  other.loss.name, other.loss.beta, other.loss.alpha = 'alphapo', 2.5, 0.5
  other.loss.importance.min_log_weight, other.seed = -0.5, 3
  assert sweep.program_key(other) == sweep.program_key(base)
  other.loss.importance.log_ratio = 'token_mean'
  assert sweep.program_key(other) != sweep.program_key(base)


def test_traced_loss_choice_and_values_equal_the_static_losses():
  rng = np.random.default_rng(1)
  n_w, n_l = rng.integers(2, 9, 16).astype(np.float32), rng.integers(2, 9, 16).astype(np.float32)
  lp_w, lp_l = -n_w * rng.uniform(1, 3, 16), -n_l * rng.uniform(1, 3, 16)
  logps = losses.PairLogps(lp_w.astype(np.float32), lp_l.astype(np.float32),
                           (lp_w + rng.normal(0, 1, 16)).astype(np.float32),
                           (lp_l + rng.normal(0, 1, 16)).astype(np.float32), n_w, n_l)
  names = ('alphapo', 'dpo', 'hinge', 'ipo', 'simpo')
  cfg = lab_defaults.get_config('quick')
  for name, beta, alpha, gamma in (('dpo', 0.1, 0.0, 0.0), ('ipo', 0.25, 0.0, 0.0),
                                   ('hinge', 0.5, 0.0, 0.0), ('simpo', 2.0, 0.0, 0.1),
                                   ('alphapo', 2.5, 0.25, 0.1), ('alphapo', 2.5, 0.0, 0.1)):
    static = copy.deepcopy(cfg.loss)
    static.name, static.beta, static.alpha, static.gamma = name, beta, alpha, gamma
    want = losses.per_pair_loss(logps, static)
    grad_want = jax.grad(lambda lp, c=static: losses.per_pair_loss(
        logps._replace(policy_chosen=lp), c).sum())(logps.policy_chosen)

    def traced(lp, index, b, a, g):
      arrays = dict(name_index=index, beta=b, alpha=a, gamma=g, eps=0.0, min_log_weight=0.0)
      return losses.per_pair_loss(logps._replace(policy_chosen=lp),
                                  sweep._run_loss(cfg.loss, names, arrays))

    args = (jnp.int32(names.index(name)), jnp.float32(beta), jnp.float32(alpha),
            jnp.float32(gamma))
    got = jax.jit(traced)(logps.policy_chosen, *args)
    grad_got = jax.jit(jax.grad(lambda lp, *a: traced(lp, *a).sum()))(logps.policy_chosen, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The unselected losses add exact zeros to the gradient (no NaN from alpha = 0 either).
    np.testing.assert_allclose(grad_got, grad_want, rtol=1e-5, atol=1e-6)
  # AlphaPO at a traced alpha of 0 is SimPO exactly.
  a0 = losses.alphapo_reward(jnp.float32(-1.7), jnp.float32(0.0))
  assert float(a0) == np.float32(-1.7)
