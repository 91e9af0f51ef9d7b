"""DPO with importance weighting on TL;DR summarization preferences, from Llama-3.2-1B.

Run (downloads the model and dataset from the Hugging Face hub, or point the paths at local
copies with --config.model.path=DIR --config.data.path=FILE_OR_DIR):
  python -m isdaa_jax.main --config=configs/tldr.py --workdir=runs/tldr
Preview the parsed, tokenized pairs first:
  python -m isdaa_jax.data --config=configs/tldr.py --dump=runs/tldr-preview.jsonl --limit=100

Data: `openai/summarize_from_feedback` comparisons (~93k train, ~86k validation pairs), each post
formatted as "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:" (TRL's format; no chat
template: the prompt is raw text) and each summary as its continuation after one space. TRL's
flattened `trl-lib/tldr-preference` (prompt/chosen/rejected strings) also works with
--config.data.hub_id=trl-lib/tldr-preference --config.data.hub_config=''.
Produces in the workdir: checkpoints, TensorBoard metrics and the final policy under hf/.
"""

import ml_collections

from isdaa_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.get_config()
  config.model.path = 'meta-llama/Llama-3.2-1B'
  config.model.param_dtype = 'float32'
  config.model.dtype = 'bfloat16'

  d = config.data
  d.source = 'tldr'
  d.hub_id = 'openai/summarize_from_feedback'
  d.hub_config = 'comparisons'
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.eval_max_examples = 2048  # evaluation reads eval_batches * batch_size = 1024 of them
  # Posts run to ~600 tokens; summaries are short.
  d.max_length = 640
  d.max_prompt_length = 576
  d.length_buckets = (256, 384, 512, 640)
  d.batch_size = 64
  d.worker_count = 2

  config.loss.name = 'dpo'
  config.loss.beta = 0.1
  config.loss.importance.enabled = True
  config.loss.importance.eps = 0.25

  config.optimizer.learning_rate = 5e-7
  config.optimizer.warmup_steps = 150

  config.train.num_steps = 1400
  config.train.eval_every = 200
  config.train.eval_batches = 16
  return config
