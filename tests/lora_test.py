"""LoRA: step 0 is the base, only adapters train, sharding invariance, resume, export, PEFT I/O."""

import json
import math
import os
import pathlib
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from isdaa_jax import checkpoint, config as config_lib, policy, sharding, train
from isdaa_jax.metrics_writer import read_metrics
from isdaa_jax.model import hf, lora, peft, safetensors_io
from train_test import BATCH, _config, _mesh, assert_same_trajectory

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
LORA = {'model.lora.rank': 4, 'model.lora.alpha': 8.0}


class LoraHarness:
  """`train.setup`'s LoRA step driven directly, with `train.run`'s base and adapters."""

  def __init__(self, cfg, mesh):
    self.mesh, self.setup = mesh, train.setup(cfg, mesh)
    self.base = policy.load_params(policy.base_model_config(cfg.model), mesh, cfg.seed,
                                   self.setup.base_sharding)
    self.adapters = policy.load_adapters(cfg.model, self.setup.model_cfg, mesh, cfg.seed,
                                         self.setup.params_sharding)
    self.state = self.setup.init_state(self.adapters)

  def step(self, local_batch):
    self.state, metrics = self.setup.train_step(self.state, self.base,
                                                sharding.global_batch(local_batch, self.mesh))
    return {k: float(v) for k, v in metrics.items()}


def logits_of(model, ids_BT):
  b, t = ids_BT.shape
  hidden = model(ids_BT, np.tile(np.arange(t), (b, 1)), np.ones((b, t), np.int32))
  return np.asarray(hidden @ model.unembedding())


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_config_defaults_off_and_validation():
  cfg = _config()
  assert cfg.model.lora.rank == 0 and tuple(cfg.model.lora.targets) == (
      'q', 'k', 'v', 'o', 'gate', 'up', 'down')
  config_lib.validate(cfg)
  for overrides, words in [
      ({'model.lora.rank': -1}, 'lora.rank must be >= 0'),
      ({'model.lora.init_from': '/x'}, 'needs config.model.lora.rank > 0'),
      ({**LORA, 'model.lora.targets': ('q', 'qq')}, 'must be distinct names'),
      ({**LORA, 'model.lora.alpha': 0.0}, 'lora.alpha must be > 0'),
      ({**LORA, 'model.lora.base_dtype': 'float16'}, 'lora.base_dtype'),
      ({**LORA, 'train.reference_path': '/ref'}, 'the reference is the base model'),
  ]:
    with pytest.raises(config_lib.ConfigError, match=words):
      config_lib.validate(_config(**overrides))


def test_adapters_init_like_peft_and_shard_with_their_projection():
  cfg = _config(**LORA, **{'mesh.fsdp': 2, 'mesh.tensor': 2})
  run_setup = train.setup(cfg, _mesh((2, 2, 2)))
  layers = run_setup.params_sharding['layers']
  assert sorted(layers) == sorted(k + s for k in ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up',
                                                  'w_down') for s in lora.SUFFIXES)
  # A along its projection's input axis, B along its output axis; the rank never sharded.
  assert layers['wq_lora_a'].spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  assert layers['wq_lora_b'].spec == jax.sharding.PartitionSpec(None, None, 'tensor', None)
  assert layers['w_down_lora_a'].spec == jax.sharding.PartitionSpec(None, 'tensor', None)
  assert layers['w_down_lora_b'].spec == jax.sharding.PartitionSpec(None, None, 'fsdp')
  h = LoraHarness(cfg, run_setup.mesh)
  a = np.asarray(h.adapters['layers']['w_up_lora_a'])  # [L, D=32, R]
  bound = 1 / math.sqrt(32)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound and a.std() > 0.5 * bound
  assert not np.asarray(h.adapters['layers']['w_up_lora_b']).any()


def test_step0_is_the_base_and_only_adapters_train():
  h = LoraHarness(_config(**LORA, **{'loss.importance.enabled': True}), _mesh((1, 1, 1)))
  base_before, adapters_before = _host(h.base), _host(h.state.params)
  m0 = h.step(BATCH)
  assert m0['loss'] == pytest.approx(math.log(2), abs=1e-6)
  assert m0['is/weight_mean'] == pytest.approx(1.0, abs=1e-6)
  assert m0['rewards/margins'] == pytest.approx(0.0, abs=1e-6)
  losses = [h.step(BATCH)['loss'] for _ in range(3)]
  assert losses[-1] < m0['loss'] - 0.05
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(_host(h.base))):
    np.testing.assert_array_equal(a, b)  # bitwise: the base is never updated
  for name, before in adapters_before['layers'].items():
    assert not np.array_equal(before, np.asarray(h.state.params['layers'][name])), name
  # The optimizer holds moments of the adapters only.
  sizes = sum(x.size for x in jax.tree.leaves(h.state.opt_state) if x.ndim)
  assert sizes == 2 * sum(x.size for x in jax.tree.leaves(h.state.params))


def test_bfloat16_base_float32_adapters():
  cfg = _config(**LORA, **{'model.lora.base_dtype': 'bfloat16'})
  h = LoraHarness(cfg, _mesh((1, 1, 1)))
  assert {x.dtype for x in jax.tree.leaves(h.base)} == {np.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(h.state.params)} == {np.dtype('float32')}
  assert h.step(BATCH)['loss'] == pytest.approx(math.log(2), abs=1e-6)


def test_one_device_equals_eight_devices():
  cfg = _config(**LORA, **{'loss.importance.enabled': True})
  assert_same_trajectory(LoraHarness(cfg, _mesh((1, 1, 1))), LoraHarness(cfg, _mesh((2, 2, 2))))


def _tiny_lora(num_steps, **overrides):
  cfg = tiny.get_config()
  cfg.train.num_steps = num_steps
  cfg.checkpoint.every_steps = 1000
  cfg.train.progress_bar = False
  cfg.train.tensorboard = False
  cfg.train.eval_every = 0
  return config_lib.apply_overrides(cfg, {**LORA, **overrides})


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def test_resume_is_exact_refuses_another_base_and_exports(tmp_path):
  """4 steps straight == 2, SIGTERM, 2 more; the checkpoint is the adapters; a resume over other
  base weights is refused; the merged HF export has the adapted model's logits."""
  straight = train.run(_tiny_lora(4), tmp_path / 'straight')

  def preempt(step, _):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  train.run(_tiny_lora(4, **{'checkpoint.export_hf': False}), tmp_path / 'split',
            step_hooks=((2, preempt),))
  resumed = train.run(_tiny_lora(4, **{'checkpoint.export_hf': False}), tmp_path / 'split')
  a, b = _losses(tmp_path / 'straight'), _losses(tmp_path / 'split')
  assert sorted(b) == list(range(1, 5)) and [a[s] for s in a] == [b[s] for s in a]
  for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(x, y)
  assert all(lora.is_adapter(k) for k in straight.params['layers']) and set(straight.params) == {
      'layers'}
  # Another seed draws another random base: refused in one sentence before anything restores.
  with pytest.raises(checkpoint.BaseMismatchError, match='trained over other base weights'):
    train.run(_tiny_lora(4, seed=1), tmp_path / 'split')

  # The merged export equals the adapted policy (base of seed 0 + trained adapters).
  cfg = _tiny_lora(4)
  mesh = sharding.make_mesh(cfg.mesh)  # the devices train.run trained on
  run_setup = train.setup(cfg, mesh)
  base = policy.load_params(cfg.model, mesh, cfg.seed, run_setup.base_sharding)
  adapted = nnx.merge(run_setup.graphdef, lora.combine(base, straight.params))
  merged = hf.load_model(str(tmp_path / 'straight' / 'hf'), cfg.model, mesh)
  ids = (np.arange(24, dtype=np.int32).reshape(2, 12) * 37 + 1) % 128
  np.testing.assert_allclose(logits_of(merged, ids), logits_of(adapted, ids), atol=2e-5,
                             rtol=1e-5)
  base_logits = logits_of(nnx.merge(run_setup.base_graphdef, base), ids)
  assert np.abs(base_logits - logits_of(adapted, ids)).max() > 1e-3
  adapter_config = json.loads((tmp_path / 'straight' / 'adapter' / peft.CONFIG_FILE).read_text())
  assert adapter_config['r'] == 4 and adapter_config['lora_alpha'] == 8.0


PEFT_FIXTURE = FIXTURES / 'lora_gqa'


def _peft_config(**overrides):
  cfg = _config(**{**LORA, 'model.path': str(FIXTURES / 'llama_gqa'),
                   'model.lora.init_from': str(PEFT_FIXTURE), **overrides})
  config_lib.validate(cfg)
  return cfg


def test_peft_adapter_loads_with_peft_logits_and_exports_as_peft_writes(tmp_path):
  cfg = _peft_config()
  mesh = _mesh((2, 2, 2))
  h = LoraHarness(cfg, mesh)
  ref = np.load(PEFT_FIXTURE / 'reference.npz')
  adapted = nnx.merge(h.setup.graphdef, lora.combine(h.base, h.adapters))
  np.testing.assert_allclose(logits_of(adapted, ref['input_ids']), ref['logits'], atol=1e-4,
                             rtol=1e-4)
  peft.save_adapter(h.adapters, h.setup.model_cfg, tmp_path, base_name=cfg.model.path)
  expected = json.loads((PEFT_FIXTURE / 'expected.json').read_text())
  ours = safetensors_io.Reader(str(tmp_path / peft.WEIGHTS_FILE))
  assert {k: list(ours.shape(k)) for k in ours.keys()} == expected['tensors']
  assert 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in expected['tensors']
  theirs = safetensors_io.Reader(str(PEFT_FIXTURE / peft.WEIGHTS_FILE))
  for k in theirs.keys():
    np.testing.assert_array_equal(ours.array(k), theirs.array(k))
  config = json.loads((tmp_path / peft.CONFIG_FILE).read_text())
  assert sorted(config) == expected['config_keys']
  # Our own folder starts a run as well (init_from round trip).
  again = policy.load_adapters(_peft_config(**{'model.lora.init_from': str(tmp_path)}).model,
                               h.setup.model_cfg, mesh, 0, h.setup.params_sharding)
  for a, b in zip(jax.tree.leaves(_host(again)), jax.tree.leaves(_host(h.adapters))):
    np.testing.assert_array_equal(a, b)


def test_peft_adapter_of_another_rank_or_missing_is_refused(tmp_path):
  mesh = _mesh((1, 1, 1))
  for overrides, words in [({'model.lora.rank': 8}, r'has r=4 but config.model.lora.rank is 8'),
                           ({'model.lora.init_from': str(tmp_path)}, 'not a PEFT adapter folder')]:
    cfg = _peft_config(**overrides)
    run_setup = train.setup(cfg, mesh)
    with pytest.raises(peft.AdapterError, match=words):
      policy.load_adapters(cfg.model, run_setup.model_cfg, mesh, 0, run_setup.params_sharding)
