"""Defaults of the over-optimization lab (`python -m isdaa_jax.lab`): the whole config of every
run it trains, plus the `lab` section (task, reference SFT, grid, seeds).

`get_config('full')` is the full study and `get_config('quick')` the README's quick mode;
`configs/lab.py` is the experiment file that runs them, and a file of your own can start from
them the same way (`from isdaa_jax.lab import defaults`).
"""

import ml_collections

from isdaa_jax import defaults
from isdaa_jax.errors import UserError


def get_config(mode: str = 'full') -> ml_collections.ConfigDict:
  if mode not in ('full', 'quick'):
    raise UserError(f"the lab config takes ':full' or ':quick', got ':{mode}'")
  quick = mode == 'quick'
  config = defaults.get_config()
  config.seed = 0

  # A tiny Llama; vocab_size comes from the task (23 tokens).
  m = config.model
  m.vocab_size = 23
  m.hidden_size = 64
  m.intermediate_size = 176
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.max_position_embeddings = 64
  m.logprob_chunk_size = 0

  d = config.data
  d.source = 'pairs'
  d.path = 'pairs.jsonl'  # written by the lab into WORKDIR; each run reads WORKDIR/pairs.jsonl
  d.max_length = 16
  d.max_prompt_length = 5
  d.length_buckets = (16,)
  d.batch_size = 64
  d.num_epochs = 100  # the run length is set by train.num_steps

  config.loss.importance.eps = 0.25
  o = config.optimizer
  # AdamW as the IS-DAA authors' script: b2 0.999, eps 1e-5, linear warmup, cosine decay to
  # 0.1 x lr, no weight decay, clip 10.
  o.learning_rate = 1e-3
  o.warmup_steps = 10
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-5
  o.weight_decay = 0.0
  o.grad_clip_norm = 10.0

  config.mesh.fsdp = 1
  config.mesh.data = -1
  config.checkpoint.every_steps = 10_000
  config.checkpoint.keep_last = 1
  config.checkpoint.keep_best = False
  config.checkpoint.async_save = False
  config.checkpoint.export_hf = False
  t = config.train
  t.num_steps = 100 if quick else 150
  t.log_every = 10
  t.eval_every = 0
  t.tensorboard = False
  t.progress_bar = False

  with config.unlocked():
    config.lab = ml_collections.ConfigDict(dict(
        mode=mode,
        task=dict(
            num_topics=4,
            num_content=16,
            prompt_content=3,
            min_response=4,
            max_response=10,
            demo_on_topic=0.2,
            k_star=0.35,
            bt_temperature=0.1,
        ),
        # Supervised training of the reference policy on demonstrations.
        sft=dict(num_demos=4096, steps=300 if quick else 400, batch_size=64, learning_rate=3e-3),
        # Preference pairs sampled from the reference and labelled by the gold reward.
        num_pairs=2048,
        # Gold reward and KL are measured on policy samples every `eval_every` steps.
        eval_every=20 if quick else 25,
        eval_prompts=128 if quick else 192,
        # (method, beta) grid; every method runs with and without the importance weight.
        methods=('dpo', 'ipo', 'hinge', 'simpo', 'alphapo'),
        betas=dict(
            dpo=(0.1,) if quick else (0.05, 0.2),
            ipo=(0.5,) if quick else (0.25, 1.0),
            # hinge (SLiC): relu(1 - beta*delta), margin 1/beta in log-ratio units.
            hinge=(0.1,) if quick else (0.05, 0.2),
            simpo=(2.0,) if quick else (1.0, 2.5),
            alphapo=(2.5,) if quick else (1.0, 2.5),
        ),
        gamma=dict(simpo=0.1, alphapo=0.1),
        alpha=0.25,
        seeds=(0,) if quick else (0, 1, 2),
    ))
  return config
