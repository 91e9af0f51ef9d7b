"""DPO with importance weighting on UltraFeedback (binarized), from Llama-3.2-1B-Instruct.

Run (downloads the model and dataset from the Hugging Face hub, or point the paths at local
copies with --config.model.path=DIR --config.data.path=FILE_OR_DIR):
  python -m isdaa_jax.main --config=configs/ultrafeedback.py --workdir=runs/ultrafeedback
Preview the parsed, tokenized pairs first:
  python -m isdaa_jax.data --config=configs/ultrafeedback.py --dump=runs/uf-preview.jsonl --limit=100

Data: `HuggingFaceH4/ultrafeedback_binarized` (train_prefs ~61k pairs, test_prefs 2k): `chosen` and
`rejected` message lists whose shared prefix is the prompt and whose last assistant turn is the
response, rendered with the model's chat template. Responses are long: pairs over max_length keep
the end of the prompt and the start of the responses.
Produces in the workdir: checkpoints, TensorBoard metrics and the final policy under hf/.
"""

import ml_collections

from isdaa_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.get_config()
  config.model.path = 'meta-llama/Llama-3.2-1B-Instruct'
  config.model.param_dtype = 'float32'
  config.model.dtype = 'bfloat16'

  d = config.data
  d.source = 'ultrafeedback'
  d.hub_id = 'HuggingFaceH4/ultrafeedback_binarized'
  d.train_split = 'train_prefs'
  d.eval_split = 'test_prefs'
  d.max_length = 1024
  d.max_prompt_length = 512
  d.length_buckets = (256, 512, 768, 1024)
  d.batch_size = 64
  d.worker_count = 2

  config.loss.name = 'dpo'
  config.loss.beta = 0.1
  config.loss.importance.enabled = True
  config.loss.importance.eps = 0.25

  config.optimizer.learning_rate = 5e-7
  config.optimizer.warmup_steps = 100

  config.train.num_steps = 950
  config.train.eval_every = 200
  config.train.eval_batches = 16
  return config
