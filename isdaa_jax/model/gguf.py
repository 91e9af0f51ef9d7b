"""Llama GGUF files (llama.cpp) -> isdaa_jax `Llama`, dequantized to the parameter dtype.

Finding the file, its metadata and its tokenizer are `isdaa_jax.gguf_file` (no model code there,
so the data pipeline reads them too). Tensors are dequantized with the `gguf` package (any type
it supports) and mapped to their Hugging Face names and layouts, then loaded through `hf`'s
sharded loader, so a GGUF model sits on the same shardings as a safetensors one. llama.cpp's
converter permutes the rows of the Q and K projections for its RoPE layout; `_unpermute` undoes
that.
"""

import pathlib

import numpy as np
from jax.sharding import Mesh

from isdaa_jax import gguf_file
from isdaa_jax.errors import ModelFileError
from isdaa_jax.model import hf_config
from isdaa_jax.model.llama import Llama, LlamaConfig

_LAYER_NAMES = {
    'attn_norm': 'input_layernorm', 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
    'ffn_norm': 'post_attention_layernorm', 'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj',
}
_TOP_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm',
              'output': 'lm_head'}


def hf_dict(reader, where: str) -> dict:
  """A Hugging Face config.json equivalent of the file's metadata (no tensor data is read)."""
  arch = gguf_file.field(reader, 'general.architecture')
  if arch != 'llama':
    raise ModelFileError(f'{where} holds a {arch!r} model, not llama; isdaa_jax reads Llama '
                          'GGUF files only')
  get = lambda key, default=None: gguf_file.field(reader, f'llama.{key}', default)
  missing = [k for k in ('block_count', 'embedding_length', 'feed_forward_length',
                         'attention.head_count') if get(k) is None]
  if missing:
    raise ModelFileError(f'{where} has no llama.{missing[0]} metadata; the file is incomplete')
  heads = int(get('attention.head_count'))
  vocab = get('vocab_size') or len(reader.fields['tokenizer.ggml.tokens'].data)
  names = {t.name for t in reader.tensors}
  return dict(
      model_type='llama', vocab_size=int(vocab), hidden_size=int(get('embedding_length')),
      intermediate_size=int(get('feed_forward_length')),
      num_hidden_layers=int(get('block_count')), num_attention_heads=heads,
      num_key_value_heads=int(get('attention.head_count_kv', heads)),
      head_dim=int(get('attention.key_length', int(get('embedding_length')) // heads)),
      rope_theta=float(get('rope.freq_base', 10000.0)),
      rms_norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-5)),
      max_position_embeddings=int(get('context_length', 2048)),
      tie_word_embeddings='output.weight' not in names, dtype='float32')


def load_config(path: pathlib.Path, model_config=None) -> LlamaConfig:
  """The file's architecture as a LlamaConfig, from metadata only (tensors are not read)."""
  return hf_config.from_hf_dict(hf_dict(gguf_file.reader(path), str(path)), model_config,
                                where=str(path))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF halves)."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_name(name: str) -> str | None:
  stem, _, kind = name.rpartition('.')
  if stem.startswith('blk.'):
    _, layer, part = stem.split('.', 2)
    hf = _LAYER_NAMES.get(part)
    return None if hf is None else f'model.layers.{layer}.{hf}.{kind}'
  hf = _TOP_NAMES.get(stem)
  return None if hf is None else f'{hf}.{kind}'


class Tensors:
  """HF tensor name -> dequantized float32 array in HF layout, read lazily from a GGUF file."""

  def __init__(self, path: pathlib.Path):
    self.folder = path
    reader = gguf_file.reader(path)
    self._hf = hf_dict(reader, str(path))
    self._by_hf = {}
    for t in reader.tensors:
      name = hf_name(t.name)
      if name is None:
        if t.name == 'rope_freqs.weight':
          continue
        raise ModelFileError(f'{path} has tensor {t.name!r}, which a Llama model does not use; '
                              'it is a different architecture')
      self._by_hf[name] = t
    self.file_of = {name: str(path) for name in self._by_hf}
    self._cache = {}

  def check(self, name: str, expected_shape: tuple):
    if name not in self._by_hf:
      raise ModelFileError(f'{self.folder} has no tensor for {name!r}; the file is incomplete '
                            'or not a Llama model')
    shape = tuple(int(n) for n in reversed(self._by_hf[name].shape))
    if shape != tuple(expected_shape):
      raise ModelFileError(f'tensor {name!r} in {self.folder} has shape {shape} but its '
                            f'metadata implies {tuple(expected_shape)}; the file is inconsistent')

  def array(self, name: str) -> np.ndarray:
    # One tensor cached: the loader asks for the same tensor once per device shard in a row.
    if name not in self._cache:
      t = self._by_hf[name]
      shape = tuple(int(n) for n in reversed(t.shape))
      w = gguf_file.package().quants.dequantize(t.data, t.tensor_type)
      w = w.astype(np.float32).reshape(shape)
      if name.endswith('q_proj.weight'):
        w = _unpermute(w, self._hf['num_attention_heads'])
      elif name.endswith('k_proj.weight'):
        w = _unpermute(w, self._hf['num_key_value_heads'])
      self._cache = {name: w}
    return self._cache[name]


def load_model(path: pathlib.Path, model_config, mesh: Mesh) -> Llama:
  """A Llama GGUF file as a `Llama` on its mesh shardings, dequantized to param_dtype."""
  from isdaa_jax.model import hf  # pylint: disable=import-outside-toplevel
  model, _ = hf.load_tensors(Tensors(path), load_config(path, model_config), mesh)
  return model
