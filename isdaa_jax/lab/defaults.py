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
  d.num_epochs = 1  # one epoch or less (lab.epochs): the scaling-laws paper's regime

  config.loss.importance.eps = 0.25
  o = config.optimizer
  # AdamW as the IS-DAA authors' script: b2 0.999, eps 1e-5, linear warmup (3 of the 32 steps of
  # the lab's epoch, ~9%; theirs is 50 of ~1250), cosine decay to 0.1 x lr, no weight decay,
  # clip 10.
  o.learning_rate = 1e-3
  o.warmup_steps = 3
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-5
  o.weight_decay = 0.0
  o.grad_clip_norm = 10.0

  config.mesh.fsdp = 1
  config.mesh.data = -1
  t = config.train
  # The pairs carry the reference's log-probs (preferences.make_pairs), so no reference model
  # runs in the step; train.num_steps is set by the study from lab.epochs and the pair count.
  t.reference = 'precomputed'
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
        # The reference, the pairs and the eval prompts are the same in both modes, so quick
        # mode's runs are a subset of the full study's (its lowest betas, seeds 0-2).
        # Supervised training of the reference policy on demonstrations.
        sft=dict(num_demos=4096, steps=300, batch_size=64, learning_rate=3e-3),
        # Preference pairs sampled from the reference and labelled by the gold reward (2048:
        # a 32-step epoch; the full study took 7 min 20 s on the idle 2-core machine, 2026-12-07).
        num_pairs=2048,
        # Each run trains this fraction of one pass over the pairs.
        epochs=1.0,
        # Gold reward and KL are measured on policy samples every `eval_every` steps (~6% of
        # the epoch).
        eval_every=2,
        eval_prompts=64,
        # Every method runs over its betas (low to high regularization; quick mode: the lowest,
        # where the IS-DAA paper puts the weight's benefit) with and without the
        # importance weight, on every seed; with/without pairs share data order and init.
        methods=('dpo', 'ipo', 'hinge', 'simpo', 'alphapo'),
        betas=dict(
            dpo=(0.02,) if quick else (0.02, 0.05, 0.1, 0.2, 0.5),
            # Summed IPO, as the authors' script: target margin 1/(2 beta) nats.
            ipo=(0.05,) if quick else (0.05, 0.1, 0.25, 0.5, 1.0),
            # hinge (SLiC): relu(1 - beta*delta), margin 1/beta in log-ratio units.
            hinge=(0.02,) if quick else (0.02, 0.05, 0.1, 0.2, 0.5),
            simpo=(0.5,) if quick else (0.5, 1.0, 2.0, 4.0, 8.0),
            alphapo=(0.5,) if quick else (0.5, 1.0, 2.5, 5.0, 10.0),
        ),
        gamma=dict(simpo=0.1, alphapo=0.1),
        alpha=0.25,
        # AlphaPO's likelihood displacement: the chosen log-prob change against alpha at one
        # beta (alpha 0 is SimPO exactly).
        displacement=dict(alphas=() if quick else (0.0, 0.25, 0.5, 1.0), beta=2.5),
        # Not in the paper: `loss.importance` variants, weight on only, for one method's betas.
        ablations=dict(
            method='ipo',
            order=() if quick else ('token_mean', 'lower_clip', 'self_normalize'),
            token_mean=dict(log_ratio='token_mean'),
            lower_clip=dict(min_log_weight=-0.5),
            self_normalize=dict(self_normalize=True),
        ),
        seeds=(0, 1, 2) if quick else (0, 1, 2, 3, 4),
        # Runs that share a compiled program train together in chunks of at most this many
        # (equal-sized, so one compilation serves them all); bounds the activations' memory.
        chunk_size=48,
    ))
  return config
