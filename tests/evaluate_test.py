"""Sample-based KL is unbiased on a case with a known KL; gold reward and win rate bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isdaa_jax import evaluate, sample
from isdaa_jax.model.llama import Llama, LlamaConfig

CFG = LlamaConfig.tiny(vocab_size=12)


def test_kl_estimate_is_unbiased_for_one_token_responses():
  policy = Llama(CFG, rngs=nnx.Rngs(0))
  reference = Llama(CFG, rngs=nnx.Rngs(1))
  # Sharpen the policy's (tied) output embedding so the two next-token distributions differ.
  policy.embed.value = policy.embed.value * 6.0
  prompt = [1, 5, 6]
  # Exact KL of the next-token distributions at the end of the prompt.
  ids = jnp.asarray([prompt])
  pos, seg = jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32)
  logp = jax.nn.log_softmax(policy(ids, pos, seg)[0, -1] @ policy.unembedding())
  logq = jax.nn.log_softmax(reference(ids, pos, seg)[0, -1] @ reference.unembedding())
  exact = float(jnp.sum(jnp.exp(logp) * (logp - logq)))
  assert exact > 0.05  # the two random models really differ

  params = sample.SamplingParams(max_new_tokens=1, temperature=1.0, eos_id=-1)
  res = evaluate.evaluate(policy, reference, [prompt] * 4096, jax.random.key(0), params,
                          gold_fn=lambda p, r, n: np.zeros(len(p)))
  assert abs(res.kl - exact) < 4 * res.kl_stderr, (res.kl, exact, res.kl_stderr)
  assert res.kl_stderr < 0.2 * exact


def test_kl_is_zero_against_itself_and_gold_and_win_rate():
  policy = Llama(CFG, rngs=nnx.Rngs(0))
  prompts = [[1, 3, 4], [1, 7], [1, 8, 9, 10]] * 4
  params = sample.SamplingParams(max_new_tokens=5, temperature=1.0, eos_id=2)
  ref_samples = sample.generate(policy, prompts, jax.random.key(1), params)
  gold = lambda p, r, n: np.asarray(n, np.float64)  # longer is better
  res = evaluate.evaluate(policy, policy, prompts, jax.random.key(1), params, gold,
                          reference_samples=ref_samples)
  assert abs(res.kl) < 1e-4
  # Same key, same model: identical samples, so every comparison is a tie.
  assert res.win_rate == 0.5
  np.testing.assert_allclose(res.gold, np.mean(evaluate.content_lengths(ref_samples)))


def test_mean_and_stderr():
  m, se = evaluate.mean_and_stderr([1.0, 2.0, 3.0, 4.0])
  assert m == 2.5 and np.isclose(se, np.std([1, 2, 3, 4], ddof=1) / 2)
