"""AdamW with linear warmup and cosine decay, global-norm clipping and a weight-decay mask."""

import jax
import optax


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  peak = opt_config.learning_rate
  warmup = min(opt_config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=peak * opt_config.min_lr_ratio)


def decay_mask(params):
  """Weight decay only on matrices: norms, biases and other 1-D (per layer) vectors are spared.

  Parameters stacked over layers carry a leading layer axis, so a norm weight [L, D] is 2-D; the
  rule therefore looks at the trailing dimensions: a parameter decays if it has at least two
  dimensions besides a stacked layer axis named in its path.
  """
  def decays(path, leaf):
    names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
    ndim = leaf.ndim - (1 if 'layers' in names else 0)
    return ndim >= 2 and not any('norm' in str(n) for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """The optax chain; gradient accumulation happens in the train step (one update per step)."""
  schedule = learning_rate_schedule(opt_config, num_steps)
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                           weight_decay=opt_config.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
