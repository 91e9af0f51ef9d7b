"""A tiny random Llama trained with DPO on generated preference pairs: the smoke test of the stack.

Run (CPU, well under a minute, no files and no network):
  python -m isdaa_jax.main --config=configs/tiny.py --workdir=runs/tiny
Produces runs/tiny/metrics.jsonl (a line per step with `step`, `loss`, ...), checkpoints (the last
step always), TensorBoard events and the final policy in Hugging Face format (runs/tiny/hf).
Rerun with a larger --config.train.num_steps on the same workdir to resume. The mesh spans every
visible device, so XLA_FLAGS=--xla_force_host_platform_device_count=8 runs it on 8 CPU devices.
"""

from isdaa_jax import defaults


def get_config():
  config = defaults.get_config()
  m = config.model
  m.vocab_size = 128
  m.hidden_size = 32
  m.intermediate_size = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 8
  m.max_position_embeddings = 128
  m.logprob_chunk_size = 16

  d = config.data
  d.source = 'synthetic'
  d.max_length = 48
  d.max_prompt_length = 24
  d.length_buckets = (32, 48)
  d.batch_size = 8
  d.num_epochs = 100
  d.synthetic.num_pairs = 64

  config.loss.name = 'dpo'
  config.loss.beta = 0.1
  config.loss.importance.enabled = True
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.checkpoint.every_steps = 10
  config.train.num_steps = 20
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.eval_batches = 2
  config.data.eval_holdout = 16
  return config
