"""Direct Alignment Algorithm losses, the IS-DAA importance weight, and their metrics.

Pure functions of per-sequence log-probabilities: no model, no I/O. Everything is jit-able,
vmap-able and differentiable. bfloat16 (and float16) inputs are computed in float32; float64 inputs
(with jax_enable_x64) stay float64.

Notation (per preference pair, log-probs summed over response tokens):
  u_w = lp_w - rp_w, u_l = lp_l - rp_l, delta = u_w - u_l, a_y = lp_y / n_y.

Per-pair losses, then averaged over the batch (`daa_loss` is the public entry point):
  dpo      -log sigmoid(beta delta); cDPO: -(1-e) log sigmoid(beta delta) - e log sigmoid(-beta delta)
  ipo      (h - 1/(2 beta))^2, h = delta, or u_w/n_w - u_l/n_l with ipo_length_normalize
  hinge    relu(1 - beta delta)                                    (SLiC)
  rdpo     -log sigmoid(beta delta + a (n_w - n_l))               (Park et al. 2024)
  simpo    -log sigmoid(beta (a_w - a_l) - gamma)
  alphapo  -log sigmoid(beta (r_w - r_l) - gamma), r = (1 - exp(-alpha a_y)) / alpha (SimPO at 0)
  chipo    dpo with phi(u) = exp(u) + u in place of u
  + sft_weight * NLL(y_w), token mean or sum (RPO)
Importance weight (IS-DAAs), never differentiated: w = exp(min((lp_w - mu_w) + (lp_l - mu_l),
2 eps)), mu the behavior policy's log-probs when the data has them, else the reference's; the
IS-DAA loss is mean(w * loss). `config.loss.importance` also holds ablations that are not in the
paper (a per-token-mean log-ratio, a lower clip, batch self-normalization).
"""

import functools
from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

LOSS_NAMES = ('dpo', 'ipo', 'hinge', 'rdpo', 'simpo', 'alphapo', 'chipo')
# Losses that do not use the reference inside the loss itself (the importance weight still does).
REFERENCE_FREE = ('simpo', 'alphapo')

# exp() arguments are clipped here: float32 overflows just above 88, and the clip only binds for
# log-ratios (chi-PO) or scaled mean log-probs (AlphaPO) far outside anything training produces.
_MAX_EXPONENT = 50.0


class PairLogps(NamedTuple):
  """Per-pair summed log-probs over response tokens, each of shape [B].

  `behavior_*` are the log-probs of the policy that generated the data; None means the reference
  is the behavior policy. The SFT term needs no extra input: NLL(y_w) is -policy_chosen (summed) or
  -policy_chosen / chosen_tokens (token mean).
  """
  policy_chosen: jax.Array
  policy_rejected: jax.Array
  reference_chosen: jax.Array
  reference_rejected: jax.Array
  chosen_tokens: jax.Array
  rejected_tokens: jax.Array
  behavior_chosen: Optional[jax.Array] = None
  behavior_rejected: Optional[jax.Array] = None


class LossOutput(NamedTuple):
  loss: jax.Array  # scalar: mean(weights * per_example) + sft_weight * mean(sft NLL)
  per_example: jax.Array  # [B] DAA loss before weighting
  weights: jax.Array  # [B] importance weights (ones when disabled), no gradient
  metrics: Mapping[str, jax.Array]  # scalars


def _f32(x):
  """Floats narrower than 32 bits (and integer counts) compute in float32; float64 stays float64."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits >= 32:
    return x
  return x.astype(jnp.float32)


def _neg_log_sigmoid(x):
  # softplus(-x) == -log(sigmoid(x)), stable for |x| of any size.
  return jax.nn.softplus(-x)


def alphapo_reward(mean_logp, alpha: float):
  """AlphaPO's reward (1 - exp(-alpha * a)) / alpha; exactly `a` at alpha == 0.

  expm1 keeps tiny alpha accurate (no cancellation), so the reward is continuous at alpha -> 0.
  """
  if isinstance(alpha, (int, float)):
    if alpha == 0.0:
      return mean_logp
    exponent = jnp.minimum(-alpha * mean_logp, _MAX_EXPONENT)
    return -jnp.expm1(exponent) / alpha
  # A traced alpha (the lab's vectorized sweep): the same value, and at 0 exactly `a`; the
  # divisor is kept nonzero so that the unselected branch's gradient is finite, not NaN.
  safe = jnp.where(alpha == 0.0, 1.0, alpha)
  reward = -jnp.expm1(jnp.minimum(-safe * mean_logp, _MAX_EXPONENT)) / safe
  return jnp.where(alpha == 0.0, mean_logp, reward)


def chipo_link(u):
  """chi-PO's link phi(u) = exp(u) + u (mixed chi-squared + KL), exponent clipped for stability."""
  return jnp.exp(jnp.minimum(u, _MAX_EXPONENT)) + u


def importance_weight(logps: PairLogps, importance_config):
  """The IS-DAA weight of each pair (no gradient) and its unclipped log-ratio, both [B].

  The authors' formulation (the defaults): w = exp(min((lp_w - mu_w) + (lp_l - mu_l), 2 eps)),
  mu the behavior policy when the data carries its log-probs, else the reference. Ablations not in
  the paper: `log_ratio='token_mean'` divides each response's log-ratio by its token count,
  `min_log_weight` > -inf clips the log-weight from below, `self_normalize` divides by the batch
  mean of the weights.
  """
  mu_w = logps.reference_chosen if logps.behavior_chosen is None else logps.behavior_chosen
  mu_l = logps.reference_rejected if logps.behavior_rejected is None else logps.behavior_rejected
  r_w = _f32(logps.policy_chosen) - _f32(mu_w)
  r_l = _f32(logps.policy_rejected) - _f32(mu_l)
  if importance_config.log_ratio == 'token_mean':
    r_w = r_w / jnp.maximum(_f32(logps.chosen_tokens), 1.0)
    r_l = r_l / jnp.maximum(_f32(logps.rejected_tokens), 1.0)
  elif importance_config.log_ratio != 'sum':
    raise ValueError("loss.importance.log_ratio must be 'sum' or 'token_mean', got "
                     f'{importance_config.log_ratio!r}')
  log_ratio = jax.lax.stop_gradient(r_w + r_l)
  log_weight = jnp.clip(log_ratio, importance_config.min_log_weight, 2.0 * importance_config.eps)
  weights = jnp.exp(log_weight)
  if importance_config.self_normalize:
    weights = weights / jnp.mean(weights)
  return jax.lax.stop_gradient(weights), log_ratio


def per_pair_loss(logps: PairLogps, loss_config):
  """The unweighted DAA loss of each pair, shape [B].

  `loss_config.name` may be a tuple of names with `loss_config.name_index` (an int, possibly
  traced) picking one: the lab's vectorized sweep trains runs of several losses in one program.
  """
  name = loss_config.name
  if not isinstance(name, str):
    # Every listed loss is computed (they are a few ops on [B]) and the chosen one selected: its
    # value and gradient are exactly its own, the others' gradients are zeros.
    per_name = [_named_loss(n, logps, loss_config) for n in name]
    index = jnp.asarray(loss_config.name_index)
    return functools.reduce(lambda acc, k: jnp.where(index == k, per_name[k], acc),
                            range(1, len(name)), per_name[0])
  return _named_loss(name, logps, loss_config)


def _named_loss(name: str, logps: PairLogps, loss_config):
  """`per_pair_loss` of the loss `name` (loss_config.name is not read)."""
  beta = loss_config.beta
  lp_w, lp_l = _f32(logps.policy_chosen), _f32(logps.policy_rejected)
  rp_w, rp_l = _f32(logps.reference_chosen), _f32(logps.reference_rejected)
  n_w, n_l = _f32(logps.chosen_tokens), _f32(logps.rejected_tokens)
  # A response always holds at least EOS; the floor only guards padded dummy rows against 0/0.
  n_w, n_l = jnp.maximum(n_w, 1.0), jnp.maximum(n_l, 1.0)
  u_w, u_l = lp_w - rp_w, lp_l - rp_l
  delta = u_w - u_l

  if name == 'dpo':
    e = loss_config.label_smoothing
    return (1.0 - e) * _neg_log_sigmoid(beta * delta) + e * _neg_log_sigmoid(-beta * delta)
  if name == 'ipo':
    h = u_w / n_w - u_l / n_l if loss_config.ipo_length_normalize else delta
    return jnp.square(h - 1.0 / (2.0 * beta))
  if name == 'hinge':
    return jax.nn.relu(1.0 - beta * delta)
  if name == 'rdpo':
    # Park et al. 2024 and the IS-DAA authors' code: a longer chosen response gets the length part
    # of its margin for free, so it earns less gradient (length regularization for a > 0).
    return _neg_log_sigmoid(beta * delta + loss_config.length_penalty * (n_w - n_l))
  if name == 'simpo':
    return _neg_log_sigmoid(beta * (lp_w / n_w - lp_l / n_l) - loss_config.gamma)
  if name == 'alphapo':
    r_w = alphapo_reward(lp_w / n_w, loss_config.alpha)
    r_l = alphapo_reward(lp_l / n_l, loss_config.alpha)
    return _neg_log_sigmoid(beta * (r_w - r_l) - loss_config.gamma)
  if name == 'chipo':
    return _neg_log_sigmoid(beta * (chipo_link(u_w) - chipo_link(u_l)))
  raise ValueError(f'unknown loss.name {name!r}; choose one of {", ".join(LOSS_NAMES)}')


def sft_nll(logps: PairLogps, normalize: str):
  """Per-pair NLL of the chosen response: summed, or the mean over its tokens."""
  nll = -_f32(logps.policy_chosen)
  if normalize == 'sum':
    return nll
  if normalize == 'mean':
    return nll / jnp.maximum(_f32(logps.chosen_tokens), 1.0)
  raise ValueError(f"loss.sft_normalize must be 'mean' or 'sum', got {normalize!r}")


def daa_loss(logps: PairLogps, loss_config) -> LossOutput:
  """The (importance-weighted) DAA loss of a batch of pairs, with TRL-style metrics.

  `loss_config` is `config.loss`: name, beta, gamma, alpha, label_smoothing, ipo_length_normalize,
  length_penalty, sft_weight, sft_normalize, importance (enabled, eps, log_ratio, min_log_weight,
  self_normalize).
  """
  per_example = per_pair_loss(logps, loss_config)
  if loss_config.importance.enabled:
    weights, log_ratio = importance_weight(logps, loss_config.importance)
    clipped = log_ratio > 2.0 * loss_config.importance.eps
  else:
    weights = jnp.ones_like(per_example)
    clipped = jnp.zeros(per_example.shape, bool)
  loss = jnp.mean(weights * per_example)

  metrics = pair_metrics(logps, loss_config.beta)
  metrics['loss/daa'] = jnp.mean(per_example)
  if loss_config.sft_weight:
    nll = jnp.mean(sft_nll(logps, loss_config.sft_normalize))
    loss = loss + loss_config.sft_weight * nll
    metrics['loss/sft'] = nll
  metrics.update({
      'is/weight_mean': jnp.mean(weights),
      'is/weight_max': jnp.max(weights),
      'is/clipped_frac': jnp.mean(clipped.astype(jnp.float32)),
      'is/ess': jnp.square(jnp.sum(weights)) / jnp.sum(jnp.square(weights)),
  })
  return LossOutput(loss=loss, per_example=per_example, weights=weights, metrics=metrics)


def pair_metrics(logps: PairLogps, beta: float) -> dict[str, jax.Array]:
  """Implicit-reward and log-prob metrics named as TRL names them."""
  lp_w, lp_l = _f32(logps.policy_chosen), _f32(logps.policy_rejected)
  u_w = lp_w - _f32(logps.reference_chosen)
  u_l = lp_l - _f32(logps.reference_rejected)
  return {
      'rewards/chosen': jnp.mean(beta * u_w),
      'rewards/rejected': jnp.mean(beta * u_l),
      'rewards/margins': jnp.mean(beta * (u_w - u_l)),
      'rewards/accuracies': jnp.mean((u_w > u_l).astype(jnp.float32)),
      'logps/chosen': jnp.mean(lp_w),
      'logps/rejected': jnp.mean(lp_l),
  }
