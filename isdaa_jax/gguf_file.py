"""A llama.cpp `.gguf` file: finding it, reading its metadata, and its tokenizer.

No model code lives here, so the data pipeline (which needs only the tokenizer and chat template)
reads a GGUF file without importing `isdaa_jax.model`; `model/gguf.py` maps its tensors onto the
Llama. The file is parsed with the `gguf` package (pure Python + numpy, from llama.cpp).
"""

import functools
import pathlib

from isdaa_jax.errors import ModelFileError, UserError

SUFFIX = '.gguf'
_INSTALL = 'pip install gguf'


class GGUFNotInstalledError(UserError, ImportError):
  """The optional `gguf` package is missing."""


def package():
  """The `gguf` module, or one sentence saying how to install it."""
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


def reader(path: pathlib.Path):
  """The file's parsed `GGUFReader` (memory-mapped; cached while the file is unchanged)."""
  stat = pathlib.Path(path).stat()
  return _cached_reader(str(path), stat.st_mtime_ns, stat.st_size)


# Parsing the metadata of a real file takes seconds (SmolLM2's 49k tokens and merges: ~13 s on a
# busy 2-core machine), and one load asks for the config, the tensors and the tokenizer; the
# reader memory-maps the file, so keeping the last two costs no copy of the weights.
@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # part of the cache key only: a rewritten file is parsed again
  return package().GGUFReader(path)


def field(gguf_reader, key: str, default=None):
  """A metadata value (`general.architecture`, `llama.block_count`, ...), or `default`."""
  f = gguf_reader.fields.get(key)
  return default if f is None else f.contents()


def load_tokenizer(path: pathlib.Path):
  """The file's byte-level BPE tokenizer and chat template as a transformers fast tokenizer.

  Built with `tokenizers` from the metadata (transformers' own GGUF route needs torch).
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  gguf_reader = reader(path)
  kind = field(gguf_reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ModelFileError(f'{path} has a {kind!r} tokenizer; only byte-level BPE (gpt2) GGUF '
                          'tokenizers are read, so set data.tokenizer to a tokenizer folder')
  tokens = field(gguf_reader, 'tokenizer.ggml.tokens')
  merges = [tuple(m.split(' ', 1)) for m in field(gguf_reader, 'tokenizer.ggml.merges')]
  types = field(gguf_reader, 'tokenizer.ggml.token_type', [1] * len(tokens))
  bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  special = [t for t, ty in zip(tokens, types) if ty == 3]  # llama.cpp CONTROL tokens
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in special])
  name = lambda key: (None if field(gguf_reader, key) is None
                      else tokens[int(field(gguf_reader, key))])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name('tokenizer.ggml.bos_token_id'),
      eos_token=name('tokenizer.ggml.eos_token_id'),
      unk_token=name('tokenizer.ggml.unknown_token_id'),
      pad_token=name('tokenizer.ggml.padding_token_id'),
      chat_template=field(gguf_reader, 'tokenizer.chat_template'))
