"""Llama GGUF files (llama.cpp) -> isdaa_jax `Llama`, dequantized to the parameter dtype.

Tensors are dequantized with the `gguf` package (any type it supports) and mapped to their
Hugging Face names and layouts, then loaded through `hf`'s sharded loader, so a GGUF model sits on
the same shardings as a safetensors one. llama.cpp's converter permutes the rows of the Q and K
projections for its RoPE layout; `_unpermute` undoes that.
"""

import functools
import pathlib

import numpy as np
from jax.sharding import Mesh

from isdaa_jax.errors import UserError
from isdaa_jax.model import hf_config
from isdaa_jax.model.hf_config import ModelFileError
from isdaa_jax.model.llama import Llama, LlamaConfig

SUFFIX = '.gguf'
_INSTALL = 'pip install gguf'

_LAYER_NAMES = {
    'attn_norm': 'input_layernorm', 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
    'ffn_norm': 'post_attention_layernorm', 'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj',
}
_TOP_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm',
              'output': 'lm_head'}


class GGUFNotInstalledError(UserError, ImportError):
  """The optional `gguf` package is missing."""


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise GGUFNotInstalledError(f'reading .gguf files needs the gguf package; run `{_INSTALL}`'
                                ) from e
  return gguf


def find(path: str) -> pathlib.Path | None:
  """The .gguf file `path` names (a file, or a folder holding exactly one), else None."""
  p = pathlib.Path(path)
  if p.is_file() and p.suffix == SUFFIX:
    return p
  if p.is_dir() and not (p / 'config.json').is_file():
    files = sorted(p.glob('*' + SUFFIX))
    if len(files) > 1:
      raise ModelFileError(f'{p} holds several .gguf files ({files[0].name}, {files[1].name}); '
                            'set model.path to one of them')
    if files:
      return files[0]
  return None


def _reader(path: pathlib.Path):
  stat = pathlib.Path(path).stat()
  return _cached_reader(str(path), stat.st_mtime_ns, stat.st_size)


# Parsing the metadata of a real file takes seconds (SmolLM2's 49k tokens and merges: ~13 s on a
# busy 2-core machine), and one load asks for the config, the tensors and the tokenizer; the
# reader memory-maps the file, so keeping the last two costs no copy of the weights.
@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # part of the cache key only: a rewritten file is parsed again
  return _gguf().GGUFReader(path)


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def hf_dict(reader, where: str) -> dict:
  """A Hugging Face config.json equivalent of the file's metadata (no tensor data is read)."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ModelFileError(f'{where} holds a {arch!r} model, not llama; isdaa_jax reads Llama '
                          'GGUF files only')
  get = lambda key, default=None: _field(reader, f'llama.{key}', default)
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
  return hf_config.from_hf_dict(hf_dict(_reader(path), str(path)), model_config, where=str(path))


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
    reader = _reader(path)
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
      w = _gguf().quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
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


def load_tokenizer(path: pathlib.Path):
  """The file's byte-level BPE tokenizer and chat template as a transformers fast tokenizer.

  Built with `tokenizers` from the metadata (transformers' own GGUF route needs torch).
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  reader = _reader(path)
  kind = _field(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ModelFileError(f'{path} has a {kind!r} tokenizer; only byte-level BPE (gpt2) GGUF '
                          'tokenizers are read, so set data.tokenizer to a tokenizer folder')
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  merges = [tuple(m.split(' ', 1)) for m in _field(reader, 'tokenizer.ggml.merges')]
  types = _field(reader, 'tokenizer.ggml.token_type', [1] * len(tokens))
  bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  special = [t for t, ty in zip(tokens, types) if ty == 3]  # llama.cpp CONTROL tokens
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in special])
  name = lambda key: (None if _field(reader, key) is None
                      else tokens[int(_field(reader, key))])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name('tokenizer.ggml.bos_token_id'),
      eos_token=name('tokenizer.ggml.eos_token_id'),
      unk_token=name('tokenizer.ggml.unknown_token_id'),
      pad_token=name('tokenizer.ggml.padding_token_id'),
      chat_template=_field(reader, 'tokenizer.chat_template'))
