"""KV-cache sampling: agrees with full recomputation, respects EOS, top-k/top-p, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isdaa_jax import sample
from isdaa_jax.model import logprobs
from isdaa_jax.model.llama import Llama, LlamaConfig

CFG = LlamaConfig.tiny(vocab_size=50)
PROMPTS = [[1, 7, 8, 9, 10], [1, 11, 12]]


def _model():
  return Llama(CFG, rngs=nnx.Rngs(3))


def _full_logps(model, prompt, response):
  seq = jnp.asarray([prompt + response], jnp.int32)
  t = seq.shape[1]
  hidden = model(seq, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
  lp = logprobs.token_logps(hidden[:, :-1], model.unembedding(), seq[:, 1:], 0)[0]
  return np.asarray(lp[len(prompt) - 1:]), np.asarray(hidden)


def test_cached_sampling_matches_full_recomputation():
  model = _model()
  params = sample.SamplingParams(max_new_tokens=6, temperature=1.0, eos_id=2)
  out = sample.generate(model, PROMPTS, jax.random.key(0), params)
  for i, prompt in enumerate(PROMPTS):
    n = out.lengths[i]
    response = out.tokens[i, :n].tolist()
    want, _ = _full_logps(model, prompt, response)
    np.testing.assert_allclose(out.logps[i, :n], want, atol=2e-5)


def test_greedy_is_argmax_of_full_forward():
  model = _model()
  params = sample.SamplingParams(max_new_tokens=5, temperature=0.0, eos_id=-1)
  out = sample.generate(model, PROMPTS, jax.random.key(0), params)
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(5):
      t = len(seq)
      h = model(jnp.asarray([seq]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
      seq.append(int(jnp.argmax(h[0, -1] @ model.unembedding())))
    assert out.tokens[i].tolist() == seq[len(prompt):]


def test_eos_stops_rows_and_pads_after():
  model = _model()
  free = sample.generate(model, PROMPTS, jax.random.key(0),
                         sample.SamplingParams(max_new_tokens=8, temperature=0.0, eos_id=-1))
  # Declare row 0's third greedy token to be EOS: row 0 must stop right there.
  eos = int(free.tokens[0, 2])
  first = free.tokens[0].tolist().index(eos)
  out = sample.generate(model, PROMPTS, jax.random.key(0),
                        sample.SamplingParams(max_new_tokens=8, temperature=0.0, eos_id=eos))
  assert out.finished[0] and out.lengths[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert np.all(out.tokens[0, first + 1:] == 0) and np.all(out.logps[0, first + 1:] == 0)
  for row, n, fin in zip(out.tokens, out.lengths, out.finished):
    if not fin:
      assert n == 8 and eos not in row.tolist()


def test_seed_reproducible_and_top_k_one_is_greedy():
  model = _model()
  p = sample.SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.9, eos_id=-1)
  a = sample.generate(model, PROMPTS, jax.random.key(5), p)
  b = sample.generate(model, PROMPTS, jax.random.key(5), p)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  greedy = sample.generate(model, PROMPTS, jax.random.key(0),
                           sample.SamplingParams(max_new_tokens=6, temperature=0.0, eos_id=-1))
  top1 = sample.generate(model, PROMPTS, jax.random.key(9),
                         sample.SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1,
                                               eos_id=-1))
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  p = sample.SamplingParams(max_new_tokens=1, top_p=0.75)
  kept = np.isfinite(np.asarray(sample._filter_logits(logits, p)))[0]
  np.testing.assert_array_equal(kept, [True, True, False, False])
