"""DAA losses against an independent float64 NumPy implementation, and their gradient properties."""

import copy

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isdaa_jax import defaults
from isdaa_jax import losses

# ---------------------------------------------------------------------------------------------
# Independent reference: written from the formulas (losses.py's docstring and the papers) in
# float64, sharing no code.


def _log_sigmoid64(x):
  return -np.logaddexp(0.0, -x)


def reference_per_pair(name, lp_w, lp_l, rp_w, rp_l, n_w, n_l, cfg):
  b = cfg.beta
  u_w, u_l = lp_w - rp_w, lp_l - rp_l
  d = u_w - u_l
  if name == 'dpo':
    e = cfg.label_smoothing
    return -(1 - e) * _log_sigmoid64(b * d) - e * _log_sigmoid64(-b * d)
  if name == 'ipo':
    h = (u_w / n_w - u_l / n_l) if cfg.ipo_length_normalize else d
    return (h - 1 / (2 * b))**2
  if name == 'hinge':
    return np.maximum(0.0, 1 - b * d)
  if name == 'rdpo':
    return -_log_sigmoid64(b * d + cfg.length_penalty * (n_w - n_l))
  if name == 'simpo':
    return -_log_sigmoid64(b * (lp_w / n_w - lp_l / n_l) - cfg.gamma)
  if name == 'alphapo':
    a_w, a_l = lp_w / n_w, lp_l / n_l
    if cfg.alpha == 0:
      r_w, r_l = a_w, a_l
    else:
      r_w = (1 - np.exp(-cfg.alpha * a_w)) / cfg.alpha
      r_l = (1 - np.exp(-cfg.alpha * a_l)) / cfg.alpha
    return -_log_sigmoid64(b * (r_w - r_l) - cfg.gamma)
  if name == 'chipo':
    phi = lambda u: np.exp(u) + u
    return -_log_sigmoid64(b * (phi(u_w) - phi(u_l)))
  raise AssertionError(name)


def reference_loss(name, arrs, cfg):
  lp_w, lp_l, rp_w, rp_l, n_w, n_l, mu_w, mu_l = (np.asarray(a, np.float64) for a in arrs)
  per = reference_per_pair(name, lp_w, lp_l, rp_w, rp_l, n_w, n_l, cfg)
  if cfg.importance.enabled:
    w = np.exp(np.minimum((lp_w - mu_w) + (lp_l - mu_l), 2 * cfg.importance.eps))
  else:
    w = np.ones_like(per)
  total = np.mean(w * per)
  if cfg.sft_weight:
    nll = -lp_w / n_w if cfg.sft_normalize == 'mean' else -lp_w
    total += cfg.sft_weight * np.mean(nll)
  return total, per, w


# ---------------------------------------------------------------------------------------------


def loss_config(name, **kw):
  cfg = defaults.loss_config()
  cfg.name = name
  for k, v in kw.items():
    if k in ('importance', 'eps'):
      continue
    setattr(cfg, k, v)
  cfg.importance.enabled = kw.get('importance', False)
  cfg.importance.eps = kw.get('eps', 0.25)
  return cfg


def _pair_logps(arrs, dtype=jnp.float32, behavior=True):
  lp_w, lp_l, rp_w, rp_l, n_w, n_l, mu_w, mu_l = (jnp.asarray(a, dtype) for a in arrs)
  return losses.PairLogps(lp_w, lp_l, rp_w, rp_l, n_w, n_l,
                          mu_w if behavior else None, mu_l if behavior else None)


VARIANTS = [
    ('dpo', dict(beta=0.1)),
    ('dpo', dict(beta=0.5, label_smoothing=0.2)),
    ('ipo', dict(beta=0.1)),
    ('ipo', dict(beta=0.3, ipo_length_normalize=True)),
    ('hinge', dict(beta=0.1)),
    ('rdpo', dict(beta=0.1, length_penalty=0.01)),
    ('simpo', dict(beta=2.0, gamma=0.5)),
    ('alphapo', dict(beta=2.5, gamma=0.1, alpha=0.25)),
    ('alphapo', dict(beta=2.5, gamma=0.1, alpha=-0.5)),
    ('alphapo', dict(beta=2.5, gamma=0.1, alpha=0.0)),
    ('chipo', dict(beta=0.1)),
    ('dpo', dict(beta=0.1, sft_weight=0.5, sft_normalize='mean')),
    ('simpo', dict(beta=2.0, gamma=0.5, sft_weight=1.0, sft_normalize='sum')),
]


@st.composite
def pair_arrays(draw):
  """Float32-representable log-probs of realistic size, token counts, behavior log-probs."""
  b = draw(st.integers(1, 8))
  logp = hnp.arrays(np.float32, b, elements=st.floats(-60, -0.5, width=32))
  drift = hnp.arrays(np.float32, b, elements=st.floats(-3, 3, width=32))
  counts = hnp.arrays(np.float32, b, elements=st.integers(1, 40).map(float))
  rp_w, rp_l = draw(logp), draw(logp)
  lp_w, lp_l = rp_w + draw(drift), rp_l + draw(drift)
  mu_w, mu_l = rp_w + draw(drift), rp_l + draw(drift)
  return [lp_w, lp_l, rp_w, rp_l, draw(counts), draw(counts), mu_w, mu_l]


@pytest.mark.parametrize('importance', [False, True])
@pytest.mark.parametrize('name,kw', VARIANTS, ids=[f'{n}-{i}' for i, (n, _) in enumerate(VARIANTS)])
@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(arrs=pair_arrays())
def test_matches_float64_reference(name, kw, importance, arrs):
  cfg = loss_config(name, importance=importance, eps=0.25, **kw)
  out = losses.daa_loss(_pair_logps(arrs), cfg)
  want_loss, want_per, want_w = reference_loss(name, arrs, cfg)
  # Float32 arithmetic on log-probs of size ~60 rounds at ~4e-6 absolute, hence the atol; AlphaPO's
  # exp of a mean log-prob of -60 amplifies float32 rounding to a few ulp, hence rtol 5e-6. The
  # 1e-6 criterion is asserted on well-conditioned inputs in the next test.
  np.testing.assert_allclose(out.per_example, want_per, rtol=5e-6, atol=2e-5)
  np.testing.assert_allclose(out.weights, want_w, rtol=1e-6)
  np.testing.assert_allclose(out.loss, want_loss, rtol=5e-6, atol=2e-5)


@pytest.mark.parametrize('name,kw', VARIANTS, ids=[f'{n}-{i}' for i, (n, _) in enumerate(VARIANTS)])
def test_matches_reference_to_1e6_relative_on_moderate_inputs(name, kw):
  """Done-when criterion: 1e-6 relative in float32 on inputs whose loss is well conditioned."""
  rng = np.random.default_rng(0)
  b = 64
  rp = rng.uniform(-8, -1, (2, b)).astype(np.float32)
  lp = (rp + rng.uniform(-1, 1, (2, b))).astype(np.float32)
  mu = (rp + rng.uniform(-0.5, 0.5, (2, b))).astype(np.float32)
  n = rng.integers(1, 30, (2, b)).astype(np.float32)
  arrs = [lp[0], lp[1], rp[0], rp[1], n[0], n[1], mu[0], mu[1]]
  for importance in (False, True):
    cfg = loss_config(name, importance=importance, eps=0.25, **kw)
    out = jax.jit(lambda l, c=cfg: losses.daa_loss(l, c))(_pair_logps(arrs))
    want_loss, _, _ = reference_loss(name, arrs, cfg)
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-6)


def test_float64_inputs_stay_float64():
  with jax.enable_x64(True):
    arrs = [np.array([-3.0, -5.0]), np.array([-4.0, -2.0]), np.array([-3.5, -4.0]),
            np.array([-3.0, -3.0]), np.array([3.0, 4.0]), np.array([2.0, 5.0]),
            np.array([-3.5, -4.0]), np.array([-3.0, -3.0])]
    cfg = loss_config('ipo', beta=0.1)
    out = losses.daa_loss(_pair_logps(arrs, jnp.float64), cfg)
    assert out.loss.dtype == jnp.float64
    np.testing.assert_allclose(out.loss, reference_loss('ipo', arrs, cfg)[0], rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Gradient and weight properties.


def _random_arrays(seed, b=16, spread=2.0):
  rng = np.random.default_rng(seed)
  rp = rng.uniform(-30, -2, (2, b)).astype(np.float32)
  lp = (rp + rng.normal(0, spread, (2, b))).astype(np.float32)
  n = rng.integers(2, 30, (2, b)).astype(np.float32)
  return [lp[0], lp[1], rp[0], rp[1], n[0], n[1], rp[0], rp[1]]


def _loss_of_policy(cfg, arrs):
  rest = [jnp.asarray(a) for a in arrs[2:]]

  def f(lp_w, lp_l):
    return losses.daa_loss(losses.PairLogps(lp_w, lp_l, *rest[:4]), cfg)
  return f


@pytest.mark.parametrize('name', losses.LOSS_NAMES)
def test_importance_gradient_is_weight_times_base_gradient(name):
  arrs = _random_arrays(1)
  on = loss_config(name, beta=0.5, gamma=0.2, alpha=0.25, importance=True, eps=0.25)
  off = copy.deepcopy(on)
  off.importance.enabled = False
  lp = (jnp.asarray(arrs[0]), jnp.asarray(arrs[1]))
  w = _loss_of_policy(on, arrs)(*lp).weights
  # The drift makes the weights differ across pairs, some clipped, so the check has teeth.
  assert float(jnp.max(w) - jnp.min(w)) > 0.1
  # Per-pair gradient of the base loss, d per_example_i / d lp_i, scaled by w_i and 1/B.
  g_on = jax.grad(lambda a, b: _loss_of_policy(on, arrs)(a, b).loss, argnums=(0, 1))(*lp)
  g_base = jax.grad(lambda a, b: jnp.sum(_loss_of_policy(off, arrs)(a, b).per_example),
                    argnums=(0, 1))(*lp)
  b = lp[0].shape[0]
  for got, base_g in zip(g_on, g_base):
    np.testing.assert_allclose(got, w * base_g / b, rtol=1e-5, atol=1e-9)


def test_weight_is_one_at_initialization_and_bounded():
  arrs = _random_arrays(2)
  cfg = loss_config('dpo', importance=True, eps=0.25)
  same = arrs[2:4] + arrs[2:]
  out = losses.daa_loss(_pair_logps(same, behavior=False), cfg)
  np.testing.assert_array_equal(out.weights, np.ones(16, np.float32))
  assert float(out.metrics['is/ess']) == pytest.approx(16.0)
  assert float(out.metrics['is/clipped_frac']) == 0.0
  # Far-drifted policy: every weight clipped at exp(2 eps), never above.
  drifted = list(arrs)
  drifted[0] = arrs[2] + 50.0
  drifted[1] = arrs[3] + 50.0
  out = losses.daa_loss(_pair_logps(drifted, behavior=False), cfg)
  assert float(jnp.max(out.weights)) <= np.exp(0.5) * (1 + 1e-7)
  assert float(out.metrics['is/clipped_frac']) == 1.0
  np.testing.assert_allclose(out.weights, np.exp(0.5), rtol=1e-6)


def test_weight_uses_behavior_policy_when_given():
  arrs = _random_arrays(3)
  cfg = loss_config('dpo', importance=True, eps=1.0)
  with_mu = losses.daa_loss(_pair_logps(arrs[:6] + [arrs[0] - 0.1, arrs[1] - 0.2]), cfg)
  np.testing.assert_allclose(with_mu.weights, np.exp(0.3), rtol=1e-5)


def test_alphapo_continuous_at_zero_and_equals_simpo():
  arrs = _random_arrays(4)
  simpo = losses.daa_loss(_pair_logps(arrs), loss_config('simpo', beta=2.5, gamma=0.1))
  a0 = losses.daa_loss(_pair_logps(arrs), loss_config('alphapo', beta=2.5, gamma=0.1, alpha=0.0))
  tiny = losses.daa_loss(_pair_logps(arrs),
                         loss_config('alphapo', beta=2.5, gamma=0.1, alpha=1e-6))
  np.testing.assert_array_equal(a0.per_example, simpo.per_example)
  np.testing.assert_allclose(tiny.per_example, simpo.per_example, rtol=1e-4)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
  arrs = _random_arrays(5)
  f = _loss_of_policy(loss_config('dpo', beta=0.1), arrs)
  g_w, g_l = jax.grad(lambda a, b: f(a, b).loss, argnums=(0, 1))(jnp.asarray(arrs[0]),
                                                                    jnp.asarray(arrs[1]))
  # Gradient descent moves along -grad: chosen up (grad < 0), rejected down (grad > 0).
  assert np.all(np.asarray(g_w) < 0) and np.all(np.asarray(g_l) > 0)


@pytest.mark.parametrize('name', losses.LOSS_NAMES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_extreme_log_ratios_stay_finite(name, dtype):
  b = 4
  big = np.array([1e4, -1e4, 1e4, -1e4], np.float32)
  arrs = [-1.0 + big, -1.0 - big, np.full(b, -1.0, np.float32), np.full(b, -1.0, np.float32),
          np.full(b, 5.0, np.float32), np.full(b, 3.0, np.float32),
          np.full(b, -1.0, np.float32), np.full(b, -1.0, np.float32)]
  cfg = loss_config(name, beta=0.5, gamma=0.1, alpha=0.25, importance=True, eps=0.25)

  def f(lp_w, lp_l):
    return losses.daa_loss(_pair_logps([lp_w, lp_l] + arrs[2:], dtype), cfg).loss

  loss, grads = jax.value_and_grad(f, argnums=(0, 1))(arrs[0], arrs[1])
  assert loss.dtype == jnp.float32
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_jit_and_vmap():
  arrs = np.stack(_random_arrays(6, b=8))  # [8 fields, 8]
  cfg = loss_config('ipo', beta=0.2, importance=True)
  batched = np.stack([arrs, arrs * 1.01])  # [2, 8 fields, 8]
  f = jax.jit(jax.vmap(lambda a: losses.daa_loss(_pair_logps(list(a)), cfg).loss))
  got = f(batched)
  np.testing.assert_allclose(got[0], reference_loss('ipo', list(arrs), cfg)[0], rtol=1e-5)
  assert got.shape == (2,)


def test_metrics_follow_trl_definitions():
  arrs = _random_arrays(7)
  out = losses.daa_loss(_pair_logps(arrs), loss_config('dpo', beta=0.1))
  u_w = arrs[0].astype(np.float64) - arrs[2]
  u_l = arrs[1].astype(np.float64) - arrs[3]
  m = {k: float(v) for k, v in out.metrics.items()}
  assert m['rewards/chosen'] == pytest.approx(np.mean(0.1 * u_w), rel=1e-5)
  assert m['rewards/rejected'] == pytest.approx(np.mean(0.1 * u_l), rel=1e-5)
  assert m['rewards/margins'] == pytest.approx(np.mean(0.1 * (u_w - u_l)), rel=1e-5, abs=1e-6)
  assert m['rewards/accuracies'] == pytest.approx(np.mean(u_w > u_l))
  assert m['logps/chosen'] == pytest.approx(np.mean(arrs[0]), rel=1e-6)
  assert m['is/weight_mean'] == 1.0 and m['is/weight_max'] == 1.0 and m['is/ess'] == 16.0


def test_unknown_loss_name_is_clear():
  with pytest.raises(ValueError, match='unknown loss.name'):
    losses.daa_loss(_pair_logps(_random_arrays(0)), loss_config('orpo'))


def test_rdpo_longer_chosen_lowers_the_loss_and_matches_hand_value():
  """Park et al. 2024: -log sigmoid(beta*delta + a*(n_w - n_l)); a longer chosen response gets
  part of its margin for free (lower loss, smaller push) when a > 0."""
  cfg = loss_config('rdpo', beta=0.1, length_penalty=0.05)
  base = [np.array([-10.0]), np.array([-12.0]), np.array([-11.0]), np.array([-11.5])]
  short = losses.daa_loss(_pair_logps(base + [np.array([10.0]), np.array([10.0])] + base[2:]), cfg)
  long = losses.daa_loss(_pair_logps(base + [np.array([30.0]), np.array([10.0])] + base[2:]), cfg)
  assert float(long.loss) < float(short.loss)
  # delta = (1) - (-0.5) = 1.5; margin 0.1*1.5 + 0.05*20 = 1.15; -log sigmoid(1.15) = log1p(e^-1.15)
  np.testing.assert_allclose(float(long.loss), np.log1p(np.exp(-1.15)), rtol=1e-6)
  # The push -dL/d delta is smaller for the longer chosen response.
  push = lambda n_w: jax.grad(lambda lp: losses.daa_loss(_pair_logps(
      [lp] + base[1:] + [np.array([n_w]), np.array([10.0])] + base[2:]), cfg).loss)(
          jnp.asarray([-10.0]))
  assert float(push(30.0)[0]) > float(push(10.0)[0])  # grads are negative: smaller magnitude


# ---------------------------------------------------------------------------------------------
# Importance-weight ablations (not in the paper), against an independent float64 formula.


def _reference_weights(arrs, eps, log_ratio='sum', min_log_weight=-np.inf, self_normalize=False):
  lp_w, lp_l, _, _, n_w, n_l, mu_w, mu_l = (np.asarray(a, np.float64) for a in arrs)
  if log_ratio == 'sum':
    s = (lp_w - mu_w) + (lp_l - mu_l)
  else:
    s = (lp_w - mu_w) / n_w + (lp_l - mu_l) / n_l
  w = np.exp(np.maximum(np.minimum(s, 2 * eps), min_log_weight))
  return w / w.mean() if self_normalize else w


@pytest.mark.parametrize('ablation', [
    dict(),
    dict(log_ratio='token_mean'),
    dict(min_log_weight=-0.5),
    dict(self_normalize=True),
    dict(log_ratio='token_mean', min_log_weight=-0.1, self_normalize=True),
], ids=['authors', 'token_mean', 'lower_clip', 'self_normalize', 'all'])
def test_importance_ablations_match_reference(ablation):
  rng = np.random.default_rng(11)
  arrs = _random_arrays(8, spread=1.0)
  arrs[6] = (arrs[2] + rng.normal(0, 1.0, 16)).astype(np.float32)
  arrs[7] = (arrs[3] + rng.normal(0, 1.0, 16)).astype(np.float32)
  cfg = loss_config('dpo', beta=0.1, importance=True, eps=0.25)
  cfg.importance.update(ablation)
  out = losses.daa_loss(_pair_logps(arrs), cfg)
  want_w = _reference_weights(arrs, 0.25, **ablation)
  np.testing.assert_allclose(out.weights, want_w, rtol=2e-6)
  _, want_per, _ = reference_loss('dpo', arrs, loss_config('dpo', beta=0.1))
  np.testing.assert_allclose(out.loss, np.mean(want_w * want_per), rtol=5e-6)
  # ESS still reported, (sum w)^2 / sum w^2 of the weights used.
  np.testing.assert_allclose(out.metrics['is/ess'], want_w.sum()**2 / np.sum(want_w**2), rtol=1e-5)
  # The checks have teeth: the drift spreads the weights, the sum clips some from above.
  assert np.ptp(want_w) > 0.05


def test_importance_ablation_properties():
  arrs = _random_arrays(9, spread=3.0)
  cfg = loss_config('dpo', beta=0.1, importance=True, eps=0.25)
  cfg.importance.min_log_weight = -0.5
  w = np.asarray(losses.daa_loss(_pair_logps(arrs, behavior=False), cfg).weights)
  assert w.min() >= np.exp(-0.5) * (1 - 1e-6) and np.any(np.isclose(w, np.exp(-0.5)))
  cfg.importance.min_log_weight = float('-inf')
  cfg.importance.self_normalize = True
  out = losses.daa_loss(_pair_logps(arrs, behavior=False), cfg)
  np.testing.assert_allclose(np.mean(out.weights), 1.0, rtol=1e-6)
  # Never differentiated: the gradient is w_i times the base per-pair gradient / B.
  f = lambda a, b: losses.daa_loss(_pair_logps([a, b] + arrs[2:], behavior=False), cfg).loss
  g = jax.grad(f)(jnp.asarray(arrs[0]), jnp.asarray(arrs[1]))
  base = jax.grad(lambda a: jnp.sum(losses.per_pair_loss(
      _pair_logps([a] + arrs[1:], behavior=False), cfg)))(jnp.asarray(arrs[0]))
  np.testing.assert_allclose(g, out.weights * base / 16, rtol=1e-5, atol=1e-9)
