"""DPO with importance weighting on Anthropic HH-RLHF, from Llama-3.2-1B-Instruct.

Run (downloads the model and dataset from the Hugging Face hub, or point the paths at local
copies with --config.model.path=DIR --config.data.path=FILE_OR_DIR):
  python -m isdaa_jax.main --config=configs/hh.py --workdir=runs/hh
Preview the parsed, tokenized pairs first:
  python -m isdaa_jax.data --config=configs/hh.py --dump=runs/hh-preview.jsonl --limit=100

Data: every HH-RLHF subset (helpful + harmless; --config.data.hub_subset=harmless-base for one),
each dialogue split at its last "\\n\\nAssistant:" into the multi-turn prompt (rendered with the
model's chat template) and the two final responses; pairs whose dialogues do not share the prompt,
with an empty response or identical responses are dropped and counted. About 160k training pairs,
8.5k test pairs; one epoch at batch 64 is ~2500 steps.
Produces in the workdir: checkpoints, TensorBoard metrics (loss, rewards/*, importance weights,
eval loss) and the final policy in Hugging Face format under hf/.
"""

import ml_collections

from isdaa_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.get_config()
  config.model.path = 'meta-llama/Llama-3.2-1B-Instruct'
  config.model.param_dtype = 'float32'
  config.model.dtype = 'bfloat16'

  d = config.data
  d.source = 'hh'
  d.hub_id = 'Anthropic/hh-rlhf'
  d.train_split = 'train'
  d.eval_split = 'test'
  d.max_length = 512
  d.max_prompt_length = 256
  d.length_buckets = (128, 256, 384, 512)
  d.batch_size = 64
  d.worker_count = 2

  config.loss.name = 'dpo'
  config.loss.beta = 0.1
  config.loss.importance.enabled = True
  config.loss.importance.eps = 0.25

  config.optimizer.learning_rate = 5e-7
  config.optimizer.warmup_steps = 150

  config.train.num_steps = 2500
  config.train.eval_every = 250
  config.train.eval_batches = 16
  return config
