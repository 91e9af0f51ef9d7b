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
  policy.embed.set_value(policy.embed.get_value() * 6.0)
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


def test_reward_model_matches_transformers_fixture():
  from isdaa_jax import defaults
  from isdaa_jax import sharding
  import pathlib
  fixture = pathlib.Path(__file__).parent / 'fixtures' / 'llama_reward'
  mesh = sharding.make_mesh(defaults.mesh_config(), devices=jax.devices()[:1])
  gold = evaluate.RewardModelGold(str(fixture), defaults.model_config(), mesh)
  ref = np.load(fixture / 'reference.npz')
  scores = evaluate.reward_scores(gold.backbone, gold.head, ref['input_ids'],
                                  ref['attention_mask'])
  np.testing.assert_allclose(scores, ref['scores'], atol=1e-4)
  # As a gold callable over (prompt, response) splits of the same rows.
  mask = ref['attention_mask']
  prompts = [row[:3].tolist() for row in ref['input_ids']]
  responses = np.stack([np.pad(row[3:], (0, 0)) for row in ref['input_ids']])
  lengths = mask.sum(1) - 3
  np.testing.assert_allclose(gold(prompts, responses, lengths), ref['scores'][:, 0], atol=1e-4)


def test_evaluate_cli(tmp_path):
  import json
  import subprocess
  import sys
  from isdaa_jax.model import hf
  repo = __import__('pathlib').Path(__file__).resolve().parents[1]
  model = Llama(LlamaConfig.tiny(vocab_size=12, tie_word_embeddings=False), rngs=nnx.Rngs(0))
  hf.save_model(model, tmp_path / 'policy')
  (tmp_path / 'prompts.jsonl').write_text(
      '\n'.join(json.dumps({'prompt_ids': [1, 3 + i % 5, 4]}) for i in range(16)))
  cmd = [sys.executable, '-m', 'isdaa_jax.evaluate', f'--policy={tmp_path / "policy"}',
         f'--reference={tmp_path / "policy"}', f'--prompts={tmp_path / "prompts.jsonl"}',
         '--gold=tests.gold_fixture:no_such_function', '--max_new_tokens=4',
         f'--out={tmp_path / "out.json"}']
  res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
  assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
      "error: cannot import the gold reward 'tests.gold_fixture:no_such_function'")
  cmd[-3] = '--gold=tests.gold_fixture:length_reward'
  res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads((tmp_path / 'out.json').read_text())
  assert abs(out['kl']) < 1e-4 and out['prompts'] == 16 and 0 <= out['win_rate'] <= 1
