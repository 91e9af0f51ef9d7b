"""GGUF -> Hugging Face folder: the SmolLM2 file converted reloads with identical log-probs, and
transformers reads it as it reads the GGUF (recorded by tests/fixtures/make_gguf_fixtures.py)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from isdaa_jax import defaults, sharding
from isdaa_jax.data import tokenize
from isdaa_jax.model import convert, hf
from smollm2_util import REFERENCE, smollm2, token_logps

CONVERTED = REFERENCE.with_name('smollm2_converted_transformers.json')


@pytest.mark.slow
def test_converted_folder_reloads_with_identical_log_probs_and_tokenizer(tmp_path):
  cfg = defaults.get_config()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  ref = dict(np.load(REFERENCE))
  ids, mask = ref['input_ids'], ref['attention_mask']
  expected = token_logps(hf.load_model(smollm2(), cfg.model, mesh), ids, mask)
  out = convert.convert(smollm2(), str(tmp_path / 'smollm2'))
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= {p.name for p in out.iterdir()}
  np.testing.assert_array_equal(token_logps(hf.load_model(str(out), cfg.model, mesh), ids, mask),
                                expected)
  tok, original = tokenize.load_tokenizer(str(out)), tokenize.load_tokenizer(smollm2())
  assert tok.chat_template == original.chat_template and tok.chat_template
  assert (tok.eos_token_id, tok.bos_token_id) == (original.eos_token_id, original.bos_token_id)
  for text, row, m in zip(ref['texts'], ids, mask):
    assert tok.encode(str(text), add_special_tokens=False) == row[m > 0].tolist()
  config = hf.read_config(out)
  assert config['eos_token_id'] == original.eos_token_id and config['tie_word_embeddings']


def test_transformers_reads_the_converted_folder_as_it_reads_the_gguf():
  record = json.loads(CONVERTED.read_text())
  ref = dict(np.load(REFERENCE))
  # Measured 0: both sides dequantize to the same float32 weights and run the same model.
  assert record['max_abs_logit_difference'] < 1e-4
  assert record['positions'] == ref['attention_mask'].sum() and record['max_abs_logit'] > 10
  # transformers' tokenizer of the converted folder gives the GGUF tokenizer's ids (which ours
  # gives too: the test above).
  for row, m, converted in zip(ref['input_ids'], ref['attention_mask'],
                               record['converted_input_ids']):
    assert converted == row[m > 0].tolist()


def test_command_refuses_a_path_that_is_no_gguf_in_one_sentence(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'isdaa_jax.model.convert', f'--gguf={tmp_path}', f'--out={tmp_path}/o'],
      capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path} is not a .gguf file or a folder holding one; give the path of the '
      'llama.cpp model file')
  assert 'Traceback' not in result.stderr
  assert not pathlib.Path(f'{tmp_path}/o').exists()
