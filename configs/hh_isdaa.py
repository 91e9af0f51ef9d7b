"""The IS-DAA authors' released HH-RLHF settings: importance-weighted summed IPO on Llama-3.2-3B.

Settings of github.com/mail-research/AIS-Sampling4DAAs `cli/train_is_dpo.py`, the code of
"Importance Sampling for Direct Alignment Algorithms" (arXiv 2506.08681, NeurIPS 2025): summed
IPO (not TRL's length-normalized one), beta 0.05, importance eps 1.0 (weight bound e^2 ~ 7.4),
AdamW (0.9, 0.999), eps 1e-5, no weight decay, lr 1e-6 with 50 warmup steps and cosine decay to
0.1 x lr, gradient clip 10, 128 pairs per step as 16 x 8 accumulation, one epoch.

The policy and reference start from a Llama-3.2-3B SFT checkpoint on HH that you supply (a
Hugging Face folder or hub id); the placeholder path below fails until you set it:
  python -m isdaa_jax.main --config=configs/hh_isdaa.py --workdir=runs/hh_isdaa \\
      --config.model.path=/path/to/your/llama-3.2-3b-hh-sft
Produces in the workdir: checkpoints, TensorBoard metrics (loss, rewards/*, is/* importance
statistics, eval loss) and the final policy in Hugging Face format under hf/.
"""

import ml_collections

from isdaa_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.get_config()
  # The user's SFT checkpoint (see the docstring); this placeholder does not exist on purpose.
  config.model.path = '/path/to/your/llama-3.2-3b-hh-sft'
  config.model.param_dtype = 'float32'
  config.model.dtype = 'bfloat16'
  config.model.remat = 'full'

  d = config.data
  d.source = 'hh'
  d.hub_id = 'Anthropic/hh-rlhf'
  d.train_split = 'train'
  d.eval_split = 'test'
  d.max_length = 512
  d.max_prompt_length = 256
  d.length_buckets = (128, 256, 384, 512)
  d.batch_size = 128  # 16 pairs x 8 accumulation steps
  d.num_epochs = 1
  d.worker_count = 2

  l = config.loss
  l.name = 'ipo'
  l.ipo_length_normalize = False  # summed IPO, as the authors' code
  l.beta = 0.05
  l.importance.enabled = True
  l.importance.eps = 1.0

  o = config.optimizer
  o.learning_rate = 1e-6
  o.warmup_steps = 50
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-5
  o.weight_decay = 0.0
  o.grad_clip_norm = 10.0
  o.grad_accum_steps = 8

  # One epoch: HH-RLHF's ~160k kept training pairs at 128 pairs per step.
  config.train.num_steps = 1250
  config.train.eval_every = 125
  config.train.eval_batches = 16
  return config
