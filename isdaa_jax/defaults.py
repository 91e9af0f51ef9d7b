"""Shared defaults for every isdaa-jax experiment.

Experiment files (`configs/hh.py`, `configs/tiny.py`, ... or a file of your own anywhere) start
from `get_config()` here and change what differs:

  from isdaa_jax import defaults

  def get_config():
    config = defaults.get_config()
    config.loss.name = 'ipo'
    return config

Every key the library reads is defined here, once, with its default and a comment; library code
never supplies a default of its own (`cfg.get(key, default)` is not used), so this file is the
documentation of the keys. `--config=` also takes this file itself (the entry points that need a
config default to it).
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The Llama architecture and how it runs (read by `isdaa_jax.model`)."""
  m = ml_collections.ConfigDict()
  # Hugging Face folder or hub id of the starting checkpoint. '' starts from random weights with
  # the architecture below (or `preset`); a path overrides both with its config.json.
  m.path = ''
  # '' uses the fields below; else one of LlamaConfig.PRESETS ('tiny', 'llama3.2-1b',
  # 'llama3.2-3b', 'llama3.1-8b', 'llama3.1-70b').
  m.preset = ''
  m.vocab_size = 512
  m.hidden_size = 64
  m.intermediate_size = 176
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.rope_theta = 10000.0
  # Llama-3 frequency scaling; rope_type '' (or 'default') disables it.
  m.rope_scaling = ml_collections.ConfigDict(dict(
      rope_type='',
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
  ))
  m.rms_norm_eps = 1e-5
  m.tie_word_embeddings = True
  m.max_position_embeddings = 2048
  # Parameter storage and matmul compute dtypes; softmax and log-probs always run in float32.
  m.param_dtype = 'float32'
  m.dtype = 'float32'
  # Rematerialization of each decoder block: 'none', 'full' (recompute the block) or 'dots'
  # (keep matmul outputs, recompute the rest).
  m.remat = 'none'
  # Scan over layers: compile time stays flat for deep models.
  m.scan_layers = False
  # Attention kernel: 'xla' (plain softmax attention, any platform), 'cudnn' (fused, GPU only) or
  # 'blocked' (pure-JAX blocked attention that never builds the T x T matrix).
  m.attention = 'xla'
  # Sequence chunk of the vocabulary projection in log-prob computation, so [B, T, V] float32
  # logits are never materialized at once: the head runs on chunks of B x chunk positions, the
  # response positions gathered first and the chunks past them skipped (prompts and padding
  # cost no head FLOPs; isdaa_jax/model/logprobs.py). Smaller chunks skip more of it (on CPU 32
  # beat 64 and 128 at SmolLM2 size); on TPU each chunk also gathers the fsdp-sharded head once.
  # 0 disables chunking (the whole head at every position at once).
  m.logprob_chunk_size = 128
  # LoRA (isdaa_jax/model/lora.py): rank 0 trains every weight; rank > 0 freezes the base and
  # trains adapters A [in, rank] (PEFT's init), B [rank, out] (zeros, so step 0 is the base) on
  # `targets`, scaled by alpha / rank. The reference is the base itself (adapters off), so no
  # reference copy is held. Adapters take `param_dtype`; `base_dtype` ('' = param_dtype, or
  # 'bfloat16') stores the frozen base. `init_from` starts the adapters from a PEFT adapter folder
  # (adapter_config.json + adapter_model.safetensors, e.g. an SFT LoRA) instead.
  m.lora = ml_collections.ConfigDict(dict(
      rank=0,
      alpha=16.0,
      targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'),
      base_dtype='',
      init_from='',
  ))
  return m


def data_config() -> ml_collections.ConfigDict:
  """Where pairs come from and how they are tokenized and batched (read by `isdaa_jax.data`)."""
  d = ml_collections.ConfigDict()
  # 'hh', 'tldr', 'ultrafeedback', 'pairs' (generic prompt/chosen/rejected) or 'synthetic'.
  d.source = 'synthetic'
  # Local file or folder (.jsonl, .jsonl.gz, .json, .parquet, or a saved HF dataset). Takes
  # precedence over `hub_id`.
  d.path = ''
  # Hugging Face hub dataset id, with `hub_subset` (data_dir, e.g. 'harmless-base' of
  # Anthropic/hh-rlhf; also the sub-folder of a local `path` folder), `hub_config` (the dataset's
  # configuration name, e.g. 'comparisons' of openai/summarize_from_feedback) and the split names.
  d.hub_id = ''
  d.hub_subset = ''
  d.hub_config = ''
  d.train_split = 'train'
  d.eval_split = 'test'
  # Held-out pairs taken from the training data when the eval split is absent (0 = none).
  d.eval_holdout = 0
  # Local eval file or folder (read like `path`); '' takes `eval_split` from `path`'s folder or
  # the hub. With a single-file `path` and no eval_path or eval_holdout there is no eval data.
  d.eval_path = ''
  # Tokenizer folder or hub id; '' uses the model's (`model.path`).
  d.tokenizer = ''
  # 'auto' uses the tokenizer's chat template when it has one, else the plain format;
  # 'plain' always uses the plain "Human: ... Assistant: ..." format.
  d.chat_format = 'auto'
  d.max_length = 512
  d.max_prompt_length = 256
  # Sequence lengths that batches are padded to (each batch takes the smallest that fits).
  d.length_buckets = (128, 256, 512)
  # Prefix sharing: one row per pair holds prompt, chosen and rejected (isdaa_jax/data/prefix.py),
  # so the prompt runs once instead of twice; log-probs are those of the two-row layout. Rows
  # take the smallest of length_buckets and their doubles that holds prompt + chosen + rejected.
  d.prefix_sharing = False
  # Padding-free packing (isdaa_jax/data/packing.py): the sequences of a batch's pairs (or their
  # prefix-shared rows) laid end to end in rows of pack_length tokens with segment ids, instead of
  # one padded row each. Pays when lengths vary a lot within a batch; padding to length_buckets
  # stays the default. pack_length 0 = the largest bucket (its double with prefix_sharing).
  d.packing = False
  d.pack_length = 0
  # Global batch size in pairs (split across JAX processes and data-parallel devices).
  d.batch_size = 8
  d.shuffle_seed = 0
  d.num_epochs = 1
  # Grain worker processes (0 = in-process).
  d.worker_count = 0
  d.worker_buffer_size = 2
  # Kept training pairs (0 = all): the first N of the train split, for quick runs.
  d.max_examples = 0
  # Kept eval pairs (0 = all): the first N of the eval split, so a large one (TL;DR's 86k) is not
  # tokenized whole when evaluation reads only train.eval_batches batches of it.
  d.eval_max_examples = 0
  # Synthetic source (source='synthetic'): number of pairs and token-length ranges.
  d.synthetic = ml_collections.ConfigDict(dict(
      num_pairs=256,
      prompt_length=(8, 24),
      response_length=(4, 16),
  ))
  return d


def loss_config() -> ml_collections.ConfigDict:
  """The DAA and the importance weight (read by `isdaa_jax.losses.daa_loss`)."""
  l = ml_collections.ConfigDict()
  # 'dpo', 'ipo', 'hinge', 'rdpo', 'simpo', 'alphapo' or 'chipo'.
  l.name = 'dpo'
  l.beta = 0.1
  # Target margin of SimPO and AlphaPO.
  l.gamma = 0.0
  # AlphaPO's reward shape; alpha -> 0 gives SimPO.
  l.alpha = 0.0
  # cDPO label smoothing (dpo only).
  l.label_smoothing = 0.0
  # IPO on length-normalized log-ratios (TRL) instead of summed ones (IS-DAA authors' code).
  l.ipo_length_normalize = False
  # R-DPO's length penalty a in -log sigmoid(beta*delta + a*(n_w - n_l)) (Park et al. 2024): a > 0
  # gives a longer chosen response part of its margin for free, so it earns less gradient.
  l.length_penalty = 0.0
  # RPO's SFT term weight on the chosen response's NLL, and its normalization ('mean' | 'sum').
  l.sft_weight = 0.0
  l.sft_normalize = 'mean'
  l.importance = ml_collections.ConfigDict(dict(
      enabled=False,
      # Upper clip of the log-weight is 2*eps; 0.25 is the authors' default (bound ~1.65).
      eps=0.25,
      # Ablations, not in the paper (the defaults are the authors' formulation):
      # 'sum' (authors) sums each response's log-ratio over its tokens; 'token_mean' divides it by
      # the response's token count, so long responses do not dominate the weight.
      log_ratio='sum',
      # Lower clip of the log-weight; -inf (authors) = no lower clip. E.g. -0.5 keeps w >= 0.61.
      min_log_weight=float('-inf'),
      # Divide the weights by their batch mean (stop-gradient), so the loss scale stays that of
      # the unweighted loss; False (authors) = plain mean of w * loss.
      self_normalize=False,
  ))
  return l


def optimizer_config() -> ml_collections.ConfigDict:
  """AdamW, schedule, clipping, accumulation (read by `isdaa_jax.train`)."""
  o = ml_collections.ConfigDict()
  o.learning_rate = 5e-7
  o.warmup_steps = 10
  # Cosine decay ends at learning_rate * min_lr_ratio at train.num_steps.
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.0
  # Global-norm clipping (0 disables).
  o.grad_clip_norm = 1.0
  # Micro-batches per step; the global batch is split into this many equal parts.
  o.grad_accum_steps = 1
  return o


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (read by `isdaa_jax.sharding`). -1 takes every device the others leave."""
  s = ml_collections.ConfigDict()
  s.data = 1
  s.fsdp = -1
  s.tensor = 1
  return s


def checkpoint_config() -> ml_collections.ConfigDict:
  """Orbax checkpointing (read by `isdaa_jax.checkpoint`)."""
  c = ml_collections.ConfigDict()
  # Save every N steps (>= 1; the last step and a preempted one are always saved, so N above
  # train.num_steps saves only at the end).
  c.every_steps = 500
  c.keep_last = 2
  # Also keep the checkpoint with the lowest eval loss (needs train.eval_every > 0).
  c.keep_best = True
  c.async_save = True
  # Write the final policy as Hugging Face safetensors to WORKDIR/hf.
  c.export_hf = True
  return c


def train_config() -> ml_collections.ConfigDict:
  """The loop (read by `isdaa_jax.train`)."""
  t = ml_collections.ConfigDict()
  t.num_steps = 1000
  # Metrics row / console line every N steps (>= 1; the last step is always logged).
  t.log_every = 10
  # Held-out evaluation every N steps (0 = never) over at most eval_batches batches.
  t.eval_every = 200
  t.eval_batches = 16
  # Peak FLOP/s of one device for MFU; 0 measures a large matmul at start-up.
  t.peak_flops_per_device = 0.0
  # The run stops as diverged (keeping the last good checkpoint) when the parameter norm exceeds
  # this multiple of the starting weights' norm: fine-tuning moves it by a few percent, a far
  # too high learning rate by orders of magnitude. 0 or inf = off.
  t.max_param_norm_ratio = 100.0
  # Where reference log-probs come from: 'model' (a frozen reference model runs in the step),
  # 'precomputed' (columns of the data, written by `isdaa_jax.score`; no reference model is held),
  # 'cached' (like 'precomputed', read from `reference_cache`; a missing cache is computed once
  # by a pre-pass with the reference model, which is then dropped; isdaa_jax/reference_cache.py)
  # or 'none' (reference-free losses simpo/alphapo without importance weighting).
  t.reference = 'model'
  # Reference checkpoint; '' uses the policy's starting weights.
  t.reference_path = ''
  # reference='cached': the train split's cache file (an eval split's is FILE-eval.npz beside
  # it), e.g. from `isdaa_jax.score --as_reference --cache_out`; '' keys it automatically as
  # WORKDIR/reference_logps/KEY-{train,eval}.npz. A file made for other pairs, tokenizer,
  # truncation, reference weights or dtypes is refused, never overwritten.
  t.reference_cache = ''
  t.tensorboard = True
  t.progress_bar = True
  return t


def sample_eval_config() -> ml_collections.ConfigDict:
  """Generation-based evaluation inside training (read by `isdaa_jax.evaluate.training_hook`).

  Every `every` steps the policy samples responses to held-out prompts; KL(policy || reference)
  from those samples, gold reward and win rate against reference samples are logged as `sample/*`
  so over-optimization curves come out of one training run.
  """
  s = ml_collections.ConfigDict()
  s.every = 0  # 0 disables it
  # JSONL with token ids per row (`prompt_ids`, or `prompt_tokens` as written by
  # `python -m isdaa_jax.data --dump`).
  s.prompts = ''
  s.num_prompts = 64
  # Gold reward: 'package.module:function' (prompts, responses, lengths) -> [B], or a Hugging Face
  # LlamaForSequenceClassification reward model; exactly one of the two.
  s.gold = ''
  s.reward_model = ''
  s.max_new_tokens = 128
  # Temperature 1 samples the policy itself, which the KL estimate assumes.
  s.temperature = 1.0
  s.top_k = 0
  s.top_p = 1.0
  s.eos_id = 2
  s.seed = 0
  return s


def distributed_config() -> ml_collections.ConfigDict:
  """Process and multi-host start-up (read by `isdaa_jax.distributed`)."""
  d = ml_collections.ConfigDict()
  # 'auto' initializes when the environment says so (TPU VM, SLURM, JAX_COORDINATOR_ADDRESS);
  # 'on' always; 'off' never.
  d.initialize = 'auto'
  d.coordinator_address = ''
  d.num_processes = 0
  d.process_id = -1
  # 'gloo' lets several CPU processes run collectives (tests, simulated hosts).
  d.cpu_collectives = ''
  # Host malloc (isdaa_jax/host_memory.py), set before JAX starts: 'reuse' keeps the memory
  # XLA:CPU frees after a step for the next one (one glibc arena, no mmap, no trim): 7-10% faster
  # CPU steps whose temporaries are large (no remat), but the heap stays at its high-water mark,
  # so where they are small it only costs peak RSS (configs/smollm2_hh.py: 6.4 against 4.0 GiB,
  # same speed). 'system' leaves glibc's defaults; 'auto' = 'reuse' on a machine with no TPU/GPU.
  d.host_malloc = 'auto'
  return d


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  config.data = data_config()
  config.loss = loss_config()
  config.optimizer = optimizer_config()
  config.mesh = mesh_config()
  config.checkpoint = checkpoint_config()
  config.train = train_config()
  config.distributed = distributed_config()
  config.sample_eval = sample_eval_config()
  # Locked: assigning a key that does not exist (a typo in an experiment file or an override)
  # fails at once instead of being silently ignored. Add new sections under `config.unlocked()`.
  config.lock()
  return config
