"""GGUF -> Hugging Face folder: `python -m isdaa_jax.model.convert --gguf=FILE --out=DIR`.

Writes model.safetensors (float32, dequantized; `hf.save_model`), config.json with the file's
bos/eos/pad ids, and the tokenizer files with the chat template (`save_pretrained`), so the
starting model and the trained policy's export are both ordinary HF folders that `hf.load_model`,
`tokenize.load_tokenizer` and transformers read. The model passes through one CPU device: the
whole float32 model is held in host memory once (0.5 GB for SmolLM2-135M).
"""

import pathlib
import sys

import jax
from absl import app, flags, logging

from isdaa_jax import defaults, gguf_file, sharding
from isdaa_jax.errors import UserError
from isdaa_jax.model import hf


class NotAGGUFError(UserError, FileNotFoundError):
  """--gguf names no .gguf file."""


def convert(gguf_path: str, out_dir: str) -> pathlib.Path:
  """Writes the HF folder of the GGUF file at `gguf_path` into `out_dir`; returns that folder."""
  path = gguf_file.find(gguf_path)
  if path is None:
    raise NotAGGUFError(f'{gguf_path} is not a .gguf file or a folder holding one; give the path '
                        'of the llama.cpp model file')
  config = defaults.get_config()
  config.model.param_dtype = config.model.dtype = 'float32'
  model = hf.load_model(str(path), config.model,
                        sharding.make_mesh(config.mesh, jax.devices('cpu')[:1]))
  tok = gguf_file.load_tokenizer(path)
  out = pathlib.Path(out_dir)
  hf.save_model(model, str(out), extra_config=hf.token_id_fields(tok))
  tok.save_pretrained(str(out))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    out = convert(flags.FLAGS.gguf, flags.FLAGS.out)
  except UserError as e:
    logging.error('%s: %s', type(e).__name__, e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'wrote {out} (config.json, model.safetensors, tokenizer files)')


if __name__ == '__main__':
  flags.DEFINE_string('gguf', None, 'Llama .gguf file (or a folder holding one).')
  flags.DEFINE_string('out', None, 'Output Hugging Face folder.')
  flags.mark_flags_as_required(['gguf', 'out'])
  app.run(main)
