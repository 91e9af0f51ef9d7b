"""The jitted sharded train step: device-count invariance, accumulation, importance weights."""

import jax
import numpy as np
import pytest

from isdaa_jax import config as config_lib
from isdaa_jax import defaults, policy, sharding, throughput, train
from isdaa_jax import reference as reference_lib
from isdaa_jax.data import collate

VOCAB = 64


def _pairs(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    prompt = [1] + rng.integers(3, VOCAB, rng.integers(3, 9)).tolist()
    out.append(dict(prompt_ids=prompt,
                    chosen_ids=rng.integers(3, VOCAB, rng.integers(2, 7)).tolist() + [2],
                    rejected_ids=rng.integers(3, VOCAB, rng.integers(2, 7)).tolist() + [2]))
  return out


def _config(**kw):
  cfg = defaults.get_config()
  m = cfg.model
  m.vocab_size, m.hidden_size, m.intermediate_size = VOCAB, 32, 64
  m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 2, 4, 2, 8
  m.logprob_chunk_size = 8
  cfg.optimizer.learning_rate = 1e-2
  cfg.optimizer.warmup_steps = 0
  cfg.train.num_steps = 10
  return config_lib.apply_overrides(cfg, kw)


class Harness:
  """`train.setup`'s step driven directly, with the starting weights and reference of `train.run`."""

  def __init__(self, cfg, mesh):
    self.mesh = mesh
    self.setup = train.setup(cfg, mesh)
    self.model_cfg, self.graphdef = self.setup.model_cfg, self.setup.graphdef
    params = policy.load_params(cfg.model, mesh, cfg.seed, self.setup.params_sharding)
    self.reference = reference_lib.build(cfg, mesh, params, self.setup.params_sharding)
    self.state = self.setup.init_state(params)

  def step(self, local_batch):
    self.state, metrics = self.setup.train_step(
        self.state, self.reference, sharding.global_batch(local_batch, self.mesh))
    return {k: float(v) for k, v in metrics.items()}


def _mesh(shape):
  m = defaults.mesh_config()
  m.data, m.fsdp, m.tensor = shape
  devices = jax.devices()[:int(np.prod(shape))]
  return sharding.make_mesh(m, devices=devices)


BATCH = collate.collate_pairs(_pairs(8), 24)


def assert_same_trajectory(one, eight):
  """Three steps of two harnesses (1 and 8 devices) give the same metrics and parameters."""
  for i in range(3):
    m1, m8 = one.step(BATCH), eight.step(BATCH)
    for k in ('loss', 'grad_norm', 'rewards/margins', 'is/weight_mean'):
      assert m8[k] == pytest.approx(m1[k], rel=2e-4, abs=1e-6), (i, k)
  for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(eight.state.params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3)


def test_one_device_equals_eight_devices_2x2x2():
  cfg = _config(**{'loss.importance.enabled': True})
  assert_same_trajectory(Harness(cfg, _mesh((1, 1, 1))), Harness(cfg, _mesh((2, 2, 2))))


@pytest.mark.parametrize('accum,mesh', [(4, (1, 1, 1)), (2, (2, 2, 2))])
def test_gradient_accumulation_equals_one_large_batch(accum, mesh):
  big = Harness(_config(), _mesh((1, 1, 1)))
  acc = Harness(_config(**{'optimizer.grad_accum_steps': accum}), _mesh(mesh))
  for _ in range(2):
    mb, ma = big.step(BATCH), acc.step(BATCH)
    assert ma['loss'] == pytest.approx(mb['loss'], rel=1e-5)
    assert ma['grad_norm'] == pytest.approx(mb['grad_norm'], rel=1e-4)
  for a, b in zip(jax.tree.leaves(big.state.params), jax.tree.leaves(acc.state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_reference_is_frozen_and_step_metrics_are_complete():
  h = Harness(_config(), _mesh((1, 1, 1)))
  ref_before = jax.tree.map(np.asarray, h.reference)
  m0 = h.step(BATCH)
  # At step 0 the policy equals the reference: zero implicit rewards, unit weights.
  assert m0['rewards/margins'] == pytest.approx(0.0, abs=1e-6)
  assert m0['loss'] == pytest.approx(np.log(2.0), rel=1e-5)
  assert m0['kl/policy_ref_chosen'] == pytest.approx(0.0, abs=1e-5)
  assert m0['tokens'] == float(BATCH['chosen_segment_ids'].sum() + BATCH['rejected_segment_ids'].sum())
  for _ in range(3):
    m = h.step(BATCH)
  for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(h.reference)):
    np.testing.assert_array_equal(a, b)
  assert m['loss'] < m0['loss'] and m['rewards/accuracies'] == 1.0
  for key in ('grad_norm', 'learning_rate', 'is/ess', 'logps/chosen', 'rewards/chosen'):
    assert key in m


def test_importance_weights_drop_below_one_after_drift_and_are_ones_when_disabled():
  on = Harness(_config(**{'loss.importance.enabled': True, 'loss.importance.eps': 0.25}),
               _mesh((1, 1, 1)))
  off = Harness(_config(), _mesh((1, 1, 1)))
  for _ in range(6):
    m_on, m_off = on.step(BATCH), off.step(BATCH)
    assert m_off['is/weight_mean'] == 1.0 and m_off['is/weight_max'] == 1.0
  # DPO pushes rejected log-probs down faster than chosen up: the summed log-ratio goes negative.
  assert m_on['is/weight_mean'] < 0.9
  assert m_on['is/weight_max'] <= np.exp(0.5) + 1e-6


def test_precomputed_reference_matches_in_step_reference():
  model_ref = Harness(_config(), _mesh((1, 1, 1)))
  graphdef = model_ref.graphdef
  lp_w, lp_l, _, _ = train.sequence_logps(graphdef, model_ref.reference, BATCH,
                                         model_ref.setup.step)
  batch = dict(BATCH, reference_chosen_logps=np.asarray(lp_w),
               reference_rejected_logps=np.asarray(lp_l))
  pre = Harness(_config(**{'train.reference': 'precomputed'}), _mesh((1, 1, 1)))
  assert pre.reference == {}
  for _ in range(2):
    a, b = model_ref.step(BATCH), pre.step(batch)
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)


def test_model_flops_per_token_count_the_passes():
  # forward 2N, backward 4N (2N under LoRA: no weight gradients for the frozen base),
  # reference forward 2N only when it runs in the step.
  n = 1000
  assert throughput.flops_per_token(n, 'model') == 8 * n
  assert throughput.flops_per_token(n, 'precomputed') == 6 * n
  assert throughput.flops_per_token(n, 'none') == 6 * n
  assert throughput.flops_per_token(n, 'model', lora=True) == 6 * n
  assert throughput.flops_per_token(n, 'cached', lora=True) == 4 * n


def test_throughput_averages_over_the_window_and_restarts():
  t = throughput.Throughput(flops_per_token=1e6, peak_flops=1e9)
  assert t.report() == {}
  t.add(100, 0.5)
  t.add(300, 0.0)  # host-bound: a step seen finished right after the one before
  r = t.report()
  assert r['perf/tokens_per_s'] == pytest.approx(800.0)
  assert r['perf/model_flops_per_s'] == pytest.approx(8e8)
  assert r['perf/mfu'] == pytest.approx(0.8)
  assert r['perf/step_seconds'] == pytest.approx(0.25)
  assert t.report() == {}
