"""Chunked log-probs equal the naive full log-softmax, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isdaa_jax.model import logprobs


def _naive(hidden, unembed, targets):
  logits = jnp.einsum('btd,dv->btv', hidden, unembed)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize('chunk', [0, 4, 7, 64])
def test_chunked_equals_naive_values_and_grads(chunk):
  rng = np.random.default_rng(0)
  b, t, d, v = 2, 19, 8, 33
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.int32)
  np.testing.assert_allclose(logprobs.token_logps(hidden, unembed, targets, chunk),
                             _naive(hidden, unembed, targets), rtol=1e-5, atol=1e-5)

  def f(h, w):
    s, _ = logprobs.sequence_logps(h, w, targets, mask, chunk)
    return jnp.sum(s * jnp.array([1.0, -2.0]))

  def f_naive(h, w):
    return jnp.sum(jnp.sum(_naive(h, w, targets) * mask, -1) * jnp.array([1.0, -2.0]))

  for got, want in zip(jax.grad(f, (0, 1))(hidden, unembed),
                       jax.grad(f_naive, (0, 1))(hidden, unembed)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  _, counts = logprobs.sequence_logps(hidden, unembed, targets, mask, chunk)
  np.testing.assert_array_equal(counts, mask.sum(-1))


def test_logps_are_float32_from_bfloat16_hidden():
  h = jnp.ones((1, 5, 4), jnp.bfloat16)
  w = jnp.ones((4, 9), jnp.float32)
  out = logprobs.token_logps(h, w, jnp.zeros((1, 5), jnp.int32), 2)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.full((1, 5), -np.log(9.0)), rtol=1e-6)


def test_chunking_bounds_compiled_memory():
  """The chunked backward's temporaries do not grow with T x V like the full logits'."""
  b, t, d, v = 1, 1024, 16, 4096

  def peak(chunk):
    def f(h, w, y):
      return jnp.sum(logprobs.token_logps(h, w, y, chunk))
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))
    return jax.jit(jax.grad(f, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  full_logits = b * t * v * 4
  assert peak(0) >= full_logits
  assert peak(64) < full_logits / 4


def _masked_case(b=4, t=24, d=8, v=33, seed=1):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  # Response-like masks: a run of positions near each row's end, of different lengths.
  mask = np.zeros((b, t), bool)
  for row, (start, stop) in enumerate([(10, 14), (3, 20), (18, 24), (0, 0)][:b]):
    mask[row, start:stop] = True
  return hidden, unembed, targets, jnp.asarray(mask)


@pytest.mark.parametrize('chunk', [0, 2, 5, 24])
def test_masked_logps_equal_naive_where_masked_and_zero_elsewhere(chunk):
  hidden, unembed, targets, mask = _masked_case()
  weights = jnp.asarray(np.random.default_rng(2).normal(size=mask.shape), jnp.float32)

  def f(h, w):
    return jnp.sum(logprobs.masked_token_logps(h, w, targets, mask, chunk) * weights)

  def f_naive(h, w):
    return jnp.sum(jnp.where(mask, _naive(h, w, targets), 0.0) * weights)

  got = logprobs.masked_token_logps(hidden, unembed, targets, mask, chunk)
  np.testing.assert_allclose(got, jnp.where(mask, _naive(hidden, unembed, targets), 0.0),
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[~np.asarray(mask)] == 0.0)
  for got_g, want_g in zip(jax.grad(f, (0, 1))(hidden, unembed),
                           jax.grad(f_naive, (0, 1))(hidden, unembed)):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-5)
  # Unmasked positions get no gradient at all: the head never ran on them, or its value was
  # dropped.
  dh = jax.grad(f)(hidden, unembed)
  assert np.all(np.asarray(dh)[~np.asarray(mask)] == 0.0)


def test_masked_logps_run_the_head_only_on_the_masked_chunks(monkeypatch):
  """The head runs (forward, and its recompute in the backward) on the chunks that hold masked
  positions only: counted by a host callback inside each chunk's head computation."""
  b, t, d, v, chunk = 4, 64, 8, 33, 2  # chunks of 8 positions: 32 chunks
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  runs = []
  real_chunk = logprobs._chunk_logps

  def counted(*args):
    jax.debug.callback(lambda: runs.append(1))
    return real_chunk(*args)

  monkeypatch.setattr(logprobs, '_chunk_logps', counted)
  grad = jax.jit(jax.grad(lambda h, w, m: jnp.sum(
      logprobs.masked_token_logps(h, w, targets, m, chunk)), (0, 1)))

  def head_runs(mask):
    runs.clear()
    jax.block_until_ready(grad(hidden, unembed, mask))
    return len(runs)

  every = head_runs(jnp.ones((b, t), bool))
  few = head_runs(jnp.zeros((b, t), bool).at[:, 40:43].set(True))  # 12 positions: 2 chunks
  none = head_runs(jnp.zeros((b, t), bool))
  assert every >= 32  # every chunk, forward (and maybe its recompute)
  assert few == 2 * every // 32  # 2 of 32 chunks
  assert none == 0


def test_masked_logps_gather_within_each_data_shard():
  """Under a data-parallel mesh each shard's rows are gathered on their own: same values as
  without a mesh, and no collective moves the hidden states."""
  from isdaa_jax import sharding
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  hidden, unembed, targets, mask = _masked_case(b=8, t=24)
  want = logprobs.masked_token_logps(hidden, unembed, targets, mask, 3)
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  args = [jax.device_put(x, rows) for x in (hidden, targets, mask)]

  def f(h, y, m):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return logprobs.masked_token_logps(h, jax.device_put(unembed), y, m, 3)
  compiled = jax.jit(f).lower(*args).compile()
  np.testing.assert_allclose(compiled(*args), want, rtol=1e-5, atol=1e-6)
  hlo = compiled.as_text()
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo, 'hidden states left their shard'
