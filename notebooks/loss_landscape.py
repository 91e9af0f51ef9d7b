# %% [markdown]
# # Loss landscapes of the Direct Alignment Algorithms
#
# How hard does each DAA still push once a pair is ranked correctly? This notebook draws, for every
# loss in `isdaa_jax.losses.LOSS_NAMES`, the loss and its gradient against the implicit reward
# margin; AlphaPO's reward shape against SimPO's; how the IS-DAA importance weight clips and
# rescales the per-pair gradient; and IPO's fixed point against DPO's unbounded push.
#
# Every value comes from the library (`per_pair_loss`, `daa_loss`, `importance_weight`,
# `alphapo_reward`) and `jax.grad`; nothing here re-implements a formula. Built from
# `notebooks/loss_landscape.py` by `python notebooks/build_notebooks.py`; edit that file, not the
# `.ipynb`. `ISDAA_NOTEBOOK_FAST=1` shrinks every grid (the CI test runs it that way).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from isdaa_jax import defaults, losses

FAST = os.environ.get('ISDAA_NOTEBOOK_FAST') == '1'
NUM_POINTS = 41 if FAST else 601  # points on every curve
NUM_STEPS = 100 if FAST else 3000  # gradient steps in the fixed-point experiment
plt.rcParams.update({'figure.dpi': 60 if FAST else 100, 'axes.grid': True, 'grid.alpha': 0.3})

# %% [markdown]
# ## A family of pairs along one margin
#
# A pair is placed by two numbers: the log-ratio margin
# `delta = (lp_w - rp_w) - (lp_l - rp_l)` (TRL logs `rewards/margins = beta * delta`) and the
# summed log-ratio `s = (lp_w - rp_w) + (lp_l - rp_l)`, which only the importance weight reads.
# Both responses have `N_TOKENS` tokens and a reference mean log-prob of `REF_MEAN_LOGP` per token,
# so the reference-free losses (SimPO, AlphaPO) see the per-token margin `delta / N_TOKENS`.

# %%
N_TOKENS = 20.0
REF_MEAN_LOGP = -1.5


def pairs(delta, log_ratio_sum=0.0, chosen_tokens=N_TOKENS, rejected_tokens=N_TOKENS):
  """PairLogps with u_w = (s + delta) / 2 and u_l = (s - delta) / 2, one pair per delta."""
  delta = jnp.asarray(delta, jnp.float32)
  s = jnp.broadcast_to(jnp.asarray(log_ratio_sum, jnp.float32), delta.shape)
  n_w = jnp.full(delta.shape, chosen_tokens, jnp.float32)
  n_l = jnp.full(delta.shape, rejected_tokens, jnp.float32)
  ref_w, ref_l = REF_MEAN_LOGP * n_w, REF_MEAN_LOGP * n_l
  return losses.PairLogps(
      policy_chosen=ref_w + (s + delta) / 2, policy_rejected=ref_l + (s - delta) / 2,
      reference_chosen=ref_w, reference_rejected=ref_l,
      chosen_tokens=n_w, rejected_tokens=n_l)


def loss_config(**overrides):
  """configs/base.py's loss section with some keys changed."""
  cfg = defaults.loss_config()
  cfg.lock()  # a misspelled key fails instead of being added
  cfg.update(overrides)
  return cfg


def loss_and_slope(cfg, delta, **pair_kwargs):
  """Per-pair loss and d loss / d delta, both [len(delta)]."""
  per_pair = lambda d: losses.per_pair_loss(pairs(d, **pair_kwargs), cfg)
  # Each pair's loss reads only its own margin: the gradient of the sum is the per-pair slope.
  slope = jax.grad(lambda d: jnp.sum(per_pair(d)))(jnp.asarray(delta, jnp.float32))
  return np.asarray(per_pair(delta)), np.asarray(slope)


# %% [markdown]
# ## Every DAA against the margin
#
# One curve per loss at the hyperparameters its paper starts from (SimPO and AlphaPO work on mean
# log-probs, so their beta is about `N_TOKENS` times larger). Solid: the loss. Dashed, right axis:
# the push `-d loss / d delta`; positive means "widen the margin further".

# %%
# label -> (config overrides, pair overrides)
CURVES = {
    'DPO': (dict(name='dpo', beta=0.1), {}),
    'cDPO (label smoothing 0.1)': (dict(name='dpo', beta=0.1, label_smoothing=0.1), {}),
    'IPO (summed)': (dict(name='ipo', beta=0.1), {}),
    'IPO (length-normalized)': (dict(name='ipo', beta=0.1, ipo_length_normalize=True), {}),
    'hinge (SLiC)': (dict(name='hinge', beta=0.1), {}),
    'R-DPO (chosen 10 tokens longer)': (
        dict(name='rdpo', beta=0.1, length_penalty=0.05),
        dict(chosen_tokens=N_TOKENS + 10, rejected_tokens=N_TOKENS)),
    'SimPO': (dict(name='simpo', beta=2.0, gamma=0.5), {}),
    'AlphaPO (alpha 0.25)': (dict(name='alphapo', beta=2.5, gamma=0.1, alpha=0.25), {}),
    'chi-PO': (dict(name='chipo', beta=0.1), {}),
}
missing = set(losses.LOSS_NAMES) - {overrides['name'] for overrides, _ in CURVES.values()}
assert not missing, f'add a curve for {sorted(missing)}'

delta = np.linspace(-60.0, 60.0, NUM_POINTS, dtype=np.float32)
curves = {label: loss_and_slope(loss_config(**cfg), delta, **pair_kwargs)
          for label, (cfg, pair_kwargs) in CURVES.items()}

fig, axes = plt.subplots(3, 3, figsize=(15, 11), sharex=True)
for ax, (label, (loss, slope)) in zip(axes.flat, curves.items()):
  ax.plot(delta, loss, color='C0')
  ax.set_title(label)
  ax.set_ylabel('loss', color='C0')
  push_ax = ax.twinx()
  push_ax.plot(delta, -slope, color='C3', linestyle='--')
  push_ax.axhline(0.0, color='C3', linewidth=0.5)
  push_ax.set_ylabel('push  -dL/d delta', color='C3')
  if np.ptp(loss) > 1e5:  # chi-PO's exp link spans many decades (loss and push stay positive)
    ax.set_yscale('log')
    push_ax.set_yscale('log')
for ax in axes[-1]:
  ax.set_xlabel('log-ratio margin delta')
fig.tight_layout()
plt.show()

# %% [markdown]
# All curves on one log axis: `|d loss / d delta|`, i.e. how hard each loss still pushes. DPO's
# push decays like `exp(-beta * delta)` but never reaches zero, so a margin can grow forever; the
# hinge stops exactly at `beta * delta = 1`; IPO and cDPO have a finite margin where the gradient
# vanishes and beyond which it pulls back (the dip on the log axis). chi-PO's exponential link
# leaves the frame on both sides: it punishes a wrong ranking enormously and stops pushing a right
# one almost at once.

# %%
fig, ax = plt.subplots(figsize=(10, 6))
for label, (_, slope) in curves.items():
  magnitude = np.abs(slope)
  # Exact zeros (hinge past its margin) have no place on a log axis.
  ax.plot(delta, np.where(magnitude > 0, magnitude, np.nan), label=label)
ax.set(yscale='log', ylim=(1e-8, 1e4))
ax.set_xlabel('log-ratio margin delta')
ax.set_ylabel('|d loss / d delta|')
ax.legend(fontsize='small')
plt.show()

# The properties the pictures show, checked so that a change in the library cannot go unnoticed.
dpo_loss, dpo_slope = curves['DPO']
assert np.all(np.diff(dpo_loss) < 0) and np.all(dpo_slope < 0), 'DPO always pushes'
hinge_loss, hinge_slope = curves['hinge (SLiC)']
assert np.all(hinge_slope[delta > 1 / 0.1] == 0), 'the hinge stops at beta * delta = 1'
ipo_slope = curves['IPO (summed)'][1]
assert ipo_slope[0] < 0 < ipo_slope[-1], 'IPO pulls a margin back past its fixed point'

# %% [markdown]
# ## AlphaPO's reward shape against SimPO's
#
# AlphaPO replaces SimPO's reward, the mean log-prob `a`, by `r_alpha(a) = (1 - exp(-alpha a)) /
# alpha`; `alpha = 0` is SimPO exactly. With `alpha > 0` the reward is concave: its slope
# `dr/da = exp(-alpha a)` grows as `a` falls, so reward gaps between unlikely responses are
# stretched. The two right panels run the full AlphaPO loss through `per_pair_loss` for a chosen
# response at mean log-prob -1 while the rejected one moves: positive alpha makes the transition
# around `a_l = a_w` sharper, and then, because the stretched margin saturates the sigmoid, stops
# pushing an already-unlikely rejected response down much sooner than SimPO does. Negative alpha
# does the opposite.

# %%
ALPHAS = (-0.5, 0.0, 0.1, 0.25, 0.5, 1.0)
mean_logp = np.linspace(-6.0, 0.0, NUM_POINTS, dtype=np.float32)
reward_slope = lambda alpha: jax.vmap(jax.grad(lambda a: losses.alphapo_reward(a, alpha)))



def alphapo_loss_vs_rejected(alpha, rejected_mean_logp):
  """AlphaPO loss (beta 2.5, gamma 0.1) with a_w = -1 and a_l moving; the reference is unused."""
  cfg = loss_config(name='alphapo', beta=2.5, gamma=0.1, alpha=alpha)
  n = jnp.full(rejected_mean_logp.shape, N_TOKENS)
  logps = losses.PairLogps(
      policy_chosen=-1.0 * n, policy_rejected=rejected_mean_logp * n,
      reference_chosen=jnp.zeros_like(n), reference_rejected=jnp.zeros_like(n),
      chosen_tokens=n, rejected_tokens=n)
  return losses.per_pair_loss(logps, cfg)


a = jnp.asarray(mean_logp)
fig, (ax_r, ax_dr, ax_loss, ax_push) = plt.subplots(1, 4, figsize=(20, 4.5))
for alpha in ALPHAS:
  label = 'SimPO (alpha 0)' if alpha == 0.0 else f'alpha {alpha}'
  style = dict(color='k', linewidth=2.5) if alpha == 0.0 else {}
  ax_r.plot(mean_logp, losses.alphapo_reward(a, alpha), label=label, **style)
  ax_dr.plot(mean_logp, reward_slope(alpha)(a), label=label, **style)
  ax_loss.plot(mean_logp, alphapo_loss_vs_rejected(alpha, a), label=label, **style)
  push_down = jax.grad(lambda x: jnp.sum(alphapo_loss_vs_rejected(alpha, x)))(a)
  ax_push.plot(mean_logp, push_down, label=label, **style)
ax_r.set(xlabel='mean log-prob a', ylabel='reward r_alpha(a)', title='reward', ylim=(-15, 1))
ax_dr.set(xlabel='mean log-prob a', ylabel='dr/da', title='reward slope (jax.grad)',
          yscale='log')
ax_loss.set(xlabel='rejected mean log-prob a_l  (a_w = -1)', ylabel='loss',
            title='AlphaPO loss (beta 2.5, gamma 0.1)')
ax_push.set(xlabel='rejected mean log-prob a_l  (a_w = -1)', ylabel='dL/da_l',
            title='push down on the rejected response', yscale='log', ylim=(1e-6, 1e2))
ax_r.legend(fontsize='small')
fig.tight_layout()
plt.show()

# alpha -> 0 is SimPO with no jump (expm1 inside the library).
np.testing.assert_allclose(losses.alphapo_reward(jnp.asarray(mean_logp), 1e-6), mean_logp,
                           rtol=1e-4, atol=1e-5)

# %% [markdown]
# ## The importance weight
#
# IS-DAAs multiply each pair's loss by `w = stop_gradient(exp(min(s, 2 eps)))`, where `s` is the
# policy/behavior log-ratio summed over both responses (here the reference is the behavior
# policy). Left: `w` against `s` for several eps; it equals 1 at initialization (`s = 0`),
# down-weights pairs the policy now finds less likely than the policy that generated them
# (`s < 0`), and up-weights the others at most to `exp(2 eps)` (1.65 for the authors' default
# eps 0.25). Middle and right: the gradient of the weighted DPO loss (`daa_loss` with
# `importance.enabled`), which is `w` times DPO's own push: the weight rescales the pair, and since
# it is never differentiated it adds no push of its own along `s`. On the right, `s = 0.5` and
# `s = 2` coincide: both sit at the clip `2 eps`.

# %%
EPSILONS = (0.1, 0.25, 0.5, 1.0)
log_ratio = np.linspace(-4.0, 4.0, NUM_POINTS, dtype=np.float32)


def weighted_dpo(eps):
  return loss_config(name='dpo', beta=0.1, importance=dict(enabled=True, eps=eps))


def per_pair_grads(cfg, delta, log_ratio_sum):
  """d daa_loss / d(delta, s) for each pair alone (daa_loss averages over a batch of one)."""
  one_pair = lambda d, s: losses.daa_loss(pairs(d[None], s[None]), cfg).loss
  return jax.vmap(jax.grad(one_pair, argnums=(0, 1)))(
      jnp.asarray(delta, jnp.float32), jnp.asarray(log_ratio_sum, jnp.float32))


zeros = np.zeros_like(log_ratio)
_, unweighted_slope = loss_and_slope(loss_config(name='dpo', beta=0.1), zeros)
fig, (ax_w, ax_push, ax_margin) = plt.subplots(1, 3, figsize=(16, 4.5))
for eps in EPSILONS:
  weight, _ = losses.importance_weight(pairs(zeros, log_ratio), weighted_dpo(eps).importance)
  ax_w.plot(log_ratio, weight, label=f'eps {eps}')
  d_delta, d_s = per_pair_grads(weighted_dpo(eps), zeros, log_ratio)
  ax_push.plot(log_ratio, -d_delta, label=f'eps {eps}')
  np.testing.assert_allclose(d_delta, weight * unweighted_slope, rtol=1e-5)
  assert np.all(d_s == 0), 'the weight must not be differentiated'
ax_push.plot(log_ratio, -unweighted_slope, color='k', linestyle=':', label='DPO, no weight')
ax_w.set(xlabel='summed log-ratio s', ylabel='w', title='importance weight', yscale='log')
ax_push.set(xlabel='summed log-ratio s', ylabel='push  -dL/d delta', title='push at delta = 0')
ax_w.legend(fontsize='small')
ax_push.legend(fontsize='small')

EPS = 0.25
for s in (-2.0, -0.5, 0.0, 0.5, 2.0):
  d_delta, _ = per_pair_grads(weighted_dpo(EPS), delta, np.full_like(delta, s))
  ax_margin.plot(delta, -d_delta, label=f's = {s}')
ax_margin.set(xlabel='log-ratio margin delta', ylabel='push  -dL/d delta',
              title=f'weighted DPO push, eps {EPS}')
ax_margin.legend(fontsize='small')
fig.tight_layout()
plt.show()

# %% [markdown]
# ## IPO's fixed point against DPO's unbounded push
#
# Let plain gradient descent move the margin of one pair directly (as if the model could set
# `delta` freely). IPO's summed loss `(delta - 1/(2 beta))^2` settles exactly at `1/(2 beta)`
# (dashed); DPO's margin keeps growing for as long as it trains, slowing only because its push
# decays: nothing in the loss stops it, which is the over-optimization IS-DAAs and IPO address.
# The step sizes differ (IPO's quadratic is much stiffer in summed log-probs); the point is where
# each one ends, not how fast.

# %%
BETAS = (0.1, 0.25, 0.5)
LEARNING_RATES = {'ipo': 0.1, 'dpo': 20.0}


def descend(cfg, learning_rate):
  """Margins of NUM_STEPS gradient steps on one pair's loss, from delta = 0."""
  slope = jax.grad(lambda d: losses.per_pair_loss(pairs(d[None]), cfg)[0])

  def step(d, _):
    d = d - learning_rate * slope(d)
    return d, d

  _, trace = jax.lax.scan(step, jnp.float32(0.0), None, length=NUM_STEPS)
  return np.asarray(trace)


steps = np.arange(1, NUM_STEPS + 1)
fig, (ax_ipo, ax_dpo) = plt.subplots(1, 2, figsize=(13, 4.5))
for i, beta in enumerate(BETAS):
  ipo = descend(loss_config(name='ipo', beta=beta), LEARNING_RATES['ipo'])
  dpo = descend(loss_config(name='dpo', beta=beta), LEARNING_RATES['dpo'])
  ax_ipo.plot(steps, ipo, color=f'C{i}', label=f'beta {beta}')
  ax_ipo.axhline(1 / (2 * beta), color=f'C{i}', linestyle='--')
  ax_dpo.plot(steps, dpo, color=f'C{i}', label=f'beta {beta}')
  ax_dpo.axhline(1 / (2 * beta), color=f'C{i}', linestyle='--')
  np.testing.assert_allclose(ipo[-1], 1 / (2 * beta), rtol=1e-4)
  assert np.all(np.diff(dpo) > 0) and dpo[-1] > 1 / (2 * beta), 'DPO never stops'
ax_ipo.set(xscale='log', xlabel='step', ylabel='margin delta',
           title=f'IPO (lr {LEARNING_RATES["ipo"]})')
ax_dpo.set(xscale='log', xlabel='step', ylabel='margin delta',
           title=f'DPO (lr {LEARNING_RATES["dpo"]}); dashed: IPO targets')
ax_ipo.legend(fontsize='small')
fig.tight_layout()
plt.show()
