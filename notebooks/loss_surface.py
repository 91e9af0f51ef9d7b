# %% [markdown]
# # The DAA loss surface around a trained lab policy
#
# A 2-D slice of the loss landscape (Li et al. 2018, "Visualizing the Loss Landscape of Neural
# Nets"): restore the final parameters `theta` of a lab training run from the folder the lab saved it in,
# draw two random directions `d1`, `d2` in parameter space, and evaluate the DAA loss of the lab's
# preference pairs at `theta + x d1 + y d2` on a grid of `(x, y)`. Random directions are
# *filter-normalized*: every parameter tensor of a direction is rescaled to the norm of the
# corresponding weight tensor (each layer's slice separately for the decoder's stacked `[L, ...]`
# parameters), so that `x = 1` moves every tensor by as much as its own size and the picture does
# not depend on how the network happens to scale its layers.
#
# The loss is evaluated twice at every point, without and with the IS-DAA importance weight
# `w = exp(min(s, 2 eps))`, where `s` is the policy's summed log-ratio to the reference over both
# responses of a pair; this is done for the run trained without the weight and for the one trained
# with it. Every value comes from the library: the parameters through
# `isdaa_jax.policy.load_params`, the batch through `isdaa_jax.data.collate.collate_pairs`,
# the log-probs through `isdaa_jax.train.pair_logps`, the loss through `isdaa_jax.losses.daa_loss`.
#
# The lab folder is `ISDAA_LAB_DIR` (default `runs/lab-quick`); when it holds no `results.json` the
# lab runs there first (quick config, ~2 minutes on 2 CPU cores; with `ISDAA_NOTEBOOK_FAST=1` a
# smoke grid in a temporary folder unless `ISDAA_LAB_DIR` is set). Fast mode also shrinks the grid.
# Built from `notebooks/loss_surface.py` by `python notebooks/build_notebooks.py`; edit that file,
# not the `.ipynb`.

# %%
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

# Lab folders are relative to the repository root (the folder holding configs/lab.py), or to the
# working directory outside a checkout.
ROOT = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
             if (p / 'configs' / 'lab.py').is_file()), pathlib.Path.cwd())
from isdaa_jax.lab import defaults as lab_defaults
from isdaa_jax import losses, policy, sharding, train
from isdaa_jax.data import collate
from isdaa_jax.lab import results as lab_results
from isdaa_jax.lab import study

FAST = os.environ.get('ISDAA_NOTEBOOK_FAST') == '1'
GRID = 5 if FAST else 21  # points along each direction
SPAN = 0.5  # the grid covers x, y in [-SPAN, SPAN]
NUM_PAIRS = 64 if FAST else 256  # preference pairs the loss is averaged over
SEED = 0  # of the random directions
PREFERRED_METHOD = 'dpo'
plt.rcParams.update({'figure.dpi': 60 if FAST else 100, 'axes.grid': False})

# %% [markdown]
# ## The lab run

# %%
LAB_DIR = pathlib.Path(os.environ.get('ISDAA_LAB_DIR', 'runs/lab-quick'))
LAB_DIR = LAB_DIR if LAB_DIR.is_absolute() else ROOT / LAB_DIR

LAB_DIR, results = lab_results.find_or_run(LAB_DIR, smoke=FAST,
                                           explicit='ISDAA_LAB_DIR' in os.environ, cwd=ROOT)
# DPO (or the lab's first method when it ran no DPO) at its first beta and first seed, without
# and with the weight.
first = min(results['summary'], key=lambda r: (r['method'] != PREFERRED_METHOD, r['method'],
                                               r['beta']))
METHOD, BETA = first['method'], first['beta']
SEED_RUN = min(p['seed'] for p in results['points'])
print(f'lab: {LAB_DIR}\nruns: {METHOD} beta {BETA:g} seed {SEED_RUN}, '
      f'{results["meta"]["steps"]} steps, importance weight off and on')

# %% [markdown]
# ## Restoring the trained policies
#
# Each run's training config is rebuilt by `study.run_config` exactly as the lab built it; the
# final parameters come from the Hugging Face folder `study.run_study` saved each sweep run's
# policy in (the vectorized sweep writes no Orbax checkpoints).

# %%
def run_config(importance):
  cfg = study.run_config(lab_defaults.get_config(results['meta']['mode']), METHOD, BETA,
                         importance, SEED_RUN, LAB_DIR / 'pairs.jsonl')
  cfg.model.path = str(LAB_DIR / 'reference')
  cfg.train.num_steps = results['meta']['steps']
  return cfg


def run_dir(importance):
  """The folder `study.run_study` trained this grid point in."""
  return LAB_DIR / 'runs' / study.run_name(METHOD, BETA, importance, SEED_RUN)


cfg = run_config(False)
mesh = sharding.make_mesh(cfg.mesh)
run_setup = train.setup(cfg, mesh)  # the wiring `train.run` used for these runs
graphdef, params_sharding = run_setup.graphdef, run_setup.params_sharding
reference_params = policy.load_params(cfg.model, mesh, cfg.seed, params_sharding)


def restore_params(importance):
  """The final policy parameters of one run, from the Hugging Face folder the lab saved."""
  cfg = run_config(importance)
  cfg.model.path = str(run_dir(importance))
  return policy.load_params(cfg.model, mesh, cfg.seed, params_sharding)


trained = {importance: restore_params(importance) for importance in (False, True)}
for importance, params in trained.items():
  moved = jnp.sqrt(sum(jnp.sum(jnp.square(p - r)) for p, r in
                       zip(jax.tree.leaves(params), jax.tree.leaves(reference_params))))
  size = jnp.sqrt(sum(jnp.sum(jnp.square(r)) for r in jax.tree.leaves(reference_params)))
  print(f'importance weight {"on " if importance else "off"}: ||theta - theta_ref|| = '
        f'{float(moved):.4f} ({float(moved / size):.2%} of ||theta_ref||)')
  assert moved > 0, 'training moved the policy away from the reference'

# %% [markdown]
# ## The pairs and the two losses
#
# The first `NUM_PAIRS` pairs of the lab's `pairs.jsonl` (the data every run trained on), collated
# into the batch layout the train step reads. The reference log-probs are the columns the lab
# stored with the pairs (`train.reference='precomputed'`), which saves a second forward pass at
# every grid point; they are checked once against the reference model the runs held.

# %%
data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
with open(LAB_DIR / 'pairs.jsonl') as f:
  rows = [json.loads(line) for line in f]
rows = rows[:min(NUM_PAIRS, len(rows)) // data_parallel * data_parallel]
batch = sharding.global_batch(collate.collate_pairs(rows, cfg.data.max_length), mesh)


def step_config(importance, reference='precomputed'):
  step_cfg = cfg.copy_and_resolve_references()
  step_cfg.loss.importance.enabled = importance
  step_cfg.train.reference = reference
  step_cfg.optimizer.grad_accum_steps = 1
  return train.StepConfig.from_config(step_cfg)


reference_logps = jax.jit(functools.partial(train.pair_logps, graphdef,
                                            cfg=step_config(False, reference='model')))
with_model = reference_logps(reference_params, reference_params, batch)
np.testing.assert_allclose(with_model.reference_chosen, batch['reference_chosen_logps'],
                           rtol=1e-5, atol=1e-4)
np.testing.assert_allclose(with_model.reference_rejected, batch['reference_rejected_logps'],
                           rtol=1e-5, atol=1e-4)
print(f'{len(rows)} pairs; loss {cfg.loss.name}, beta {cfg.loss.beta:g}, '
      f'importance eps {cfg.loss.importance.eps:g}')

# %% [markdown]
# ## Filter-normalized random directions
#
# A Gaussian direction per parameter tensor, rescaled so that each tensor of the direction (each
# layer's slice of a stacked decoder parameter) has the Frobenius norm of the same tensor of the
# trained weights. The RMSNorm scales are treated like every other tensor.

# %%
def filter_normalized_direction(rng, params):
  """A random direction shaped like `params`, each tensor scaled to its weight's norm."""
  def one(path, w):
    # The decoder stacks its layers along a leading axis: normalize each layer on its own.
    axes = tuple(range(1, w.ndim)) if path[0].key == 'layers' else None
    norm = lambda x: np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axes, keepdims=True))
    d = rng.standard_normal(w.shape)
    return (d * (norm(w) / norm(d))).astype(w.dtype)
  # On the host: a few hundred thousand numbers, not worth compiling a program for.
  return jax.tree_util.tree_map_with_path(one, jax.device_get(params))


def slice_norms(path, x):
  """Norm of each layer's slice of a stacked decoder parameter, else of the whole tensor."""
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x.reshape(x.shape[0], -1), axis=1) if path[0].key == 'layers' else \
      np.linalg.norm(x.ravel())


directions = {}
for importance, params in trained.items():
  rng = np.random.default_rng(SEED)  # the same draw for both runs, rescaled to each one's weights
  d_x, d_y = (filter_normalized_direction(rng, params) for _ in range(2))
  for (path, w), dx, dy in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0],
                               jax.tree.leaves(d_x), jax.tree.leaves(d_y)):
    np.testing.assert_allclose(slice_norms(path, dx), slice_norms(path, w), rtol=1e-4)
    np.testing.assert_allclose(slice_norms(path, dy), slice_norms(path, w), rtol=1e-4)
  directions[importance] = jax.device_put((d_x, d_y), (params_sharding, params_sharding))

# %% [markdown]
# ## The surface
#
# At every grid point one forward pass gives the pair log-probs, and `daa_loss` turns them into
# the loss without the weight and with it. The weight is never differentiated: a training step at
# `theta` descends `mean(w(theta) * loss_i)` with the weights *held at their values at `theta`*,
# so that surrogate is drawn too, next to the weighted loss with the weights recomputed at every
# point (the objective's value as training would log it there) and the weights' batch mean.

# %%
STEP_OFF, STEP_ON = step_config(False), step_config(True)


@jax.jit
def surface_point(params, d_x, d_y, x, y, batch, frozen_weights):
  """Losses at theta + x d_x + y d_y: unweighted, weights held fixed, weighted; mean weight."""
  moved = jax.tree.map(lambda w, a, b: w + x * a + y * b, params, d_x, d_y)
  logps = train.pair_logps(graphdef, moved, {}, batch, STEP_OFF)
  off, on = losses.daa_loss(logps, STEP_OFF.loss), losses.daa_loss(logps, STEP_ON.loss)
  held = jnp.mean(frozen_weights * off.per_example)
  return off.loss, held, on.loss, on.metrics['is/weight_mean'], on.weights


KINDS = ('loss without the weight', 'loss, weights held at the centre',
         'loss with the weight', 'mean importance weight')
axis = np.linspace(-SPAN, SPAN, GRID, dtype=np.float32)
center = GRID // 2
assert axis[center] == 0.0
surfaces = {}  # importance of the trained run -> [KINDS, y, x]
for importance, params in trained.items():
  d_x, d_y = directions[importance]
  ones = jnp.ones(len(rows), jnp.float32)
  *_, frozen = surface_point(params, d_x, d_y, 0.0, 0.0, batch, ones)
  values = np.zeros((len(KINDS), GRID, GRID))
  for i, y in enumerate(axis):
    for j, x in enumerate(axis):
      values[:, i, j] = jax.device_get(surface_point(params, d_x, d_y, x, y, batch, frozen)[:4])
  assert np.all(np.isfinite(values)), 'the loss is finite over the whole grid'
  surfaces[importance] = values

# The centre is the trained policy itself: there the library's eval step gives the same losses,
# and holding the weights at their centre values changes nothing.
@jax.jit
def eval_losses(params, batch):
  return [train.eval_step(params, {}, batch, graphdef=graphdef, cfg=step_cfg)['loss']
          for step_cfg in (STEP_OFF, STEP_ON)]


for importance, params in trained.items():
  off, on = eval_losses(params, batch)
  np.testing.assert_allclose(surfaces[importance][0, center, center], off, rtol=1e-4)
  np.testing.assert_allclose(surfaces[importance][2, center, center], on, rtol=1e-4)
  np.testing.assert_allclose(surfaces[importance][1, center, center],
                             surfaces[importance][2, center, center], rtol=1e-5)

# %% [markdown]
# Rows: the run trained without the weight, the run trained with it; every panel has its own
# colour scale, and the white cross is the trained policy. What to look for:
#
# - The unweighted loss: is the trained policy at the bottom of a basin, or still on a slope?
# - The weighted loss with the weights recomputed at every point is a different kind of surface:
#   wherever a step makes the data less likely than under the reference (summed log-ratio `s < 0`)
#   every weight `exp(min(s, 2 eps))` shrinks towards 0 and takes the loss with it, so the value
#   tends to *fall* away from the data, towards degenerate policies. Training never descends that
#   surface, because the weight is a stop-gradient.
# - The surrogate with the weights held at their centre values is what a step from the trained
#   policy descends: the unweighted basin with each pair rescaled. Its overall level is the mean
#   weight at the centre; with Adam that scale cancels out of the update, and only the weights'
#   spread across pairs (the effective sample size `is/ess` in the metrics) changes the step.
# - The mean weight: where it is far below 1 at the centre, the policy has made the preference data
#   much less likely than the reference did (likelihood displacement, see `overoptimization`).

# %%
fig, axes = plt.subplots(2, len(KINDS), figsize=(5.2 * len(KINDS), 9.5), squeeze=False)
X, Y = np.meshgrid(axis, axis)
for row, importance in enumerate((False, True)):
  for col, kind in enumerate(KINDS):
    ax, values = axes[row, col], surfaces[importance][col]
    levels = np.linspace(values.min(), values.max(), 21)
    if np.ptp(values) == 0:  # a flat panel (e.g. weights all clipped) still draws
      levels = 21
    filled = ax.contourf(X, Y, values, levels=levels,
                         cmap='coolwarm' if col == len(KINDS) - 1 else 'viridis')
    ax.contour(X, Y, values, levels=levels, colors='k', linewidths=0.4, alpha=0.5)
    ax.plot([0.0], [0.0], marker='+', color='w', markersize=14, markeredgewidth=2)
    fig.colorbar(filled, ax=ax, shrink=0.8)
    ax.set(title=f'{kind}\n(policy trained {"with" if importance else "without"} the weight)',
           xlabel='direction 1', ylabel='direction 2', aspect='equal')
fig.tight_layout()
plt.show()

# %% [markdown]
# The same surfaces along the two axes through the trained policy.

# %%
COLORS = ('tab:red', 'tab:purple', 'tab:blue')
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False)
for col, importance in enumerate((False, True)):
  ax = axes[0, col]
  values = surfaces[importance]
  for kind, color in enumerate(COLORS):
    ax.plot(axis, values[kind, center, :], color=color, label=f'{KINDS[kind]}, direction 1')
    ax.plot(axis, values[kind, :, center], color=color, linestyle='--',
            label=f'{KINDS[kind]}, direction 2')
  ax.axvline(0.0, color='k', linewidth=0.8)
  ax.set(title=f'policy trained {"with" if importance else "without"} the weight',
         xlabel='step along the direction', ylabel=f'{METHOD} loss', yscale='log')
  ax.legend(fontsize='small')
  ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
for importance in (False, True):
  print(f'policy trained {"with" if importance else "without"} the weight:')
  for kind, values in zip(KINDS, surfaces[importance]):
    print(f'  {kind:34s} centre {values[center, center]:.4f}, '
          f'grid {values.min():.4f}..{values.max():.4f}')
