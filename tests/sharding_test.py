"""Mesh construction, logical-axis shardings, and sharded == unsharded compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from isdaa_jax import defaults
from isdaa_jax import sharding
from isdaa_jax.model import logprobs
from isdaa_jax.model.llama import Llama, LlamaConfig


def _mesh_cfg(data, fsdp, tensor):
  m = defaults.mesh_config()
  m.data, m.fsdp, m.tensor = data, fsdp, tensor
  return m


def test_mesh_fill_and_errors():
  mesh = sharding.make_mesh(_mesh_cfg(2, -1, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  one = sharding.make_mesh(_mesh_cfg(1, -1, 1), devices=jax.devices()[:1])
  assert one.size == 1
  with pytest.raises(sharding.MeshError, match='not divisible by 3'):
    sharding.make_mesh(_mesh_cfg(3, -1, 1))
  with pytest.raises(sharding.MeshError, match='product match'):
    sharding.make_mesh(_mesh_cfg(2, 2, 1))
  with pytest.raises(sharding.MeshError, match='at most one -1'):
    sharding.make_mesh(_mesh_cfg(-1, -1, 1))
  assert sharding.mesh_shape(_mesh_cfg(1, 1, -1), 4) == (1, 1, 4)


def test_logical_rules_and_indivisible_fallback():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  assert sharding.logical_to_spec(('vocab', 'embed'), (64, 32), mesh) == P('tensor', 'fsdp')
  # 97 is not divisible by the tensor axis: replicated, not an error.
  assert sharding.logical_to_spec(('vocab', 'embed'), (97, 32), mesh) == P(None, 'fsdp')
  assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))


def test_state_shardings_follow_the_table_for_every_parameter():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  cfg = LlamaConfig.tiny(vocab_size=97, tie_word_embeddings=False)  # 97: tensor cannot split it
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  specs = {'/'.join(map(str, path)): s.spec for path, s in
           nnx.to_flat_state(sharding.state_shardings(nnx.state(abstract), mesh))}
  assert specs == {
      'embed': P(None, 'fsdp'),
      'final_norm': P('fsdp'),
      'lm_head': P('fsdp', None),
      'layers/attn_norm': P(None, 'fsdp'),
      'layers/mlp_norm': P(None, 'fsdp'),
      'layers/wq': P(None, 'fsdp', 'tensor', None),
      'layers/wk': P(None, 'fsdp', 'tensor', None),
      'layers/wv': P(None, 'fsdp', 'tensor', None),
      'layers/wo': P(None, 'tensor', None, 'fsdp'),
      'layers/w_gate': P(None, 'fsdp', 'tensor'),
      'layers/w_up': P(None, 'fsdp', 'tensor'),
      'layers/w_down': P(None, 'tensor', 'fsdp'),
  }


def _loss(model, batch):
  hidden = model(batch['ids'], batch['pos'], batch['seg'])
  s, _ = logprobs.sequence_logps(hidden, model.unembedding(), batch['y'], batch['seg'], 4)
  return jnp.mean(s)


def test_sharded_and_unsharded_logits_and_grads_agree():
  cfg = LlamaConfig.tiny(vocab_size=128)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, (8, 16)).astype(np.int32)
  batch = dict(ids=ids, pos=np.tile(np.arange(16, dtype=np.int32), (8, 1)),
               seg=np.ones((8, 16), np.int32), y=np.roll(ids, -1, 1))

  def run(mesh):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    gb = sharding.global_batch(batch, mesh)

    @jax.jit
    def f(state, gb):
      m = nnx.merge(graphdef, state)
      return nnx.value_and_grad(_loss)(m, gb), m(gb['ids'], gb['pos'], gb['seg'])

    (loss, grads), hidden = f(state, gb)
    return loss, nnx.state(grads), hidden, state

  mesh8 = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  mesh1 = sharding.make_mesh(_mesh_cfg(1, 1, 1), devices=jax.devices()[:1])
  l8, g8, h8, s8 = run(mesh8)
  l1, g1, h1, _ = run(mesh1)
  # Parameters really are split across devices on the 2x2x2 mesh.
  wq = s8['layers']['wq'].get_value()
  assert wq.sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert len({s.device for s in wq.addressable_shards}) == 8
  np.testing.assert_allclose(h8, h1, atol=2e-5)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_model_activation_constraint_uses_the_batch_axes():
  """The model names the data-parallel axes itself (it does not import this module)."""
  from isdaa_jax.model import llama
  assert llama.DATA_PARALLEL_AXES == sharding.BATCH_AXES
