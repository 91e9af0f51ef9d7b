"""Over-optimization evaluation: sample-based KL to the reference, gold reward, win rate.

KL(pi || pi_ref) is estimated from policy samples y ~ pi(.|x) as the mean of the sequence
log-ratio log pi(y|x) - log pi_ref(y|x): an unbiased estimator whose standard error is reported.
The gold reward is any callable `gold(prompts [B, P] ragged list, responses [B, N], lengths [B])
-> [B]` (the lab's known reward, or `RewardModel.as_gold_fn`).
"""

import dataclasses
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isdaa_jax import sample
from isdaa_jax.data import collate
from isdaa_jax.errors import MissingFileError, UserError
from isdaa_jax.model import pair_logps

GoldFn = Callable[[Sequence[Sequence[int]], np.ndarray, np.ndarray], np.ndarray]


def mean_and_stderr(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float('nan')
  return float(x.mean()), se


@jax.jit
def _response_logps(graphdef, state, batch):
  return pair_logps.side(nnx.merge(graphdef, state), batch, 'chosen', 0)[0]


def response_logps(model: nnx.Module, prompts: Sequence[Sequence[int]], responses: np.ndarray,
                   lengths: np.ndarray, seq_len: int = 0) -> np.ndarray:
  """Summed log-probs [B] of each response (its first `lengths` tokens) under `model`.

  `seq_len` > 0 fixes the padded length (one compilation for calls of any sample lengths)."""
  pairs = [dict(prompt_ids=p, chosen_ids=r[:n], rejected_ids=r[:n])
           for p, r, n in zip(prompts, np.asarray(responses), np.asarray(lengths))]
  seq_len = seq_len or max(collate.pair_length(p) for p in pairs)
  batch = collate.collate_pairs(pairs, seq_len)
  batch = {k: v for k, v in batch.items() if k.startswith('chosen_')}
  graphdef, state = nnx.split(model)
  return np.asarray(_response_logps(graphdef, state, batch))


@dataclasses.dataclass
class EvalResult:
  kl: float
  kl_stderr: float
  gold: float
  gold_stderr: float
  length: float
  win_rate: float  # vs reference samples under the gold reward, ties count 1/2 (nan if not run)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def evaluate(policy: nnx.Module, reference: nnx.Module, prompts: Sequence[Sequence[int]],
             key: jax.Array, params: sample.SamplingParams, gold_fn: GoldFn,
             reference_samples: sample.Samples | None = None) -> EvalResult:
  """Samples the policy on `prompts`; KL to the reference, gold reward and win rate.

  `reference_samples` (the reference's own samples on the same prompts) enable the win rate;
  pass them in so that they are drawn once per study, not once per evaluation.
  """
  out = sample.generate(policy, prompts, key, params)
  lp_ref = response_logps(reference, prompts, out.tokens, out.lengths)
  return score_samples(out, lp_ref, prompts, gold_fn, reference_samples)


def score_samples(out: sample.Samples, lp_ref: np.ndarray, prompts: Sequence[Sequence[int]],
                  gold_fn: GoldFn, reference_samples: sample.Samples | None) -> EvalResult:
  """`evaluate`'s statistics of policy samples `out`, given their reference log-probs."""
  lp_policy = out.logps.sum(axis=1)
  kl, kl_se = mean_and_stderr(lp_policy - lp_ref)
  content = content_lengths(out)
  gold_B = np.asarray(gold_fn(prompts, out.tokens, content))
  gold, gold_se = mean_and_stderr(gold_B)
  win = float('nan')
  if reference_samples is not None:
    ref_gold = np.asarray(gold_fn(prompts, reference_samples.tokens,
                                  content_lengths(reference_samples)))
    win = float(np.mean((gold_B > ref_gold) + 0.5 * (gold_B == ref_gold)))
  return EvalResult(kl=kl, kl_stderr=kl_se, gold=gold, gold_stderr=gold_se,
                    length=float(out.lengths.mean()), win_rate=win)


def content_lengths(samples: sample.Samples) -> np.ndarray:
  """Generated tokens before EOS."""
  return samples.lengths - samples.finished.astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Reward models and gold-reward callables.


@jax.jit
def _reward_scores(graphdef, state, head_DL, input_ids_BT, segment_ids_BT):
  backbone = nnx.merge(graphdef, state)
  positions = jnp.maximum(jnp.cumsum(segment_ids_BT, axis=1) - 1, 0)
  hidden = backbone(input_ids_BT, positions, segment_ids_BT)
  # The score of the last non-padding token, as transformers' LlamaForSequenceClassification.
  t = segment_ids_BT.shape[1]
  last = jnp.max(jnp.where(segment_ids_BT > 0, jnp.arange(t), -1), axis=1)
  h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return jnp.einsum('bd,dl->bl', h_last.astype(jnp.float32), head_DL.astype(jnp.float32))


def reward_scores(backbone: nnx.Module, head_DL, input_ids_BT, segment_ids_BT) -> np.ndarray:
  """[B, labels] scores of right-padded sequences (segment 0 = padding)."""
  graphdef, state = nnx.split(backbone)
  return np.asarray(_reward_scores(graphdef, state, head_DL, jnp.asarray(input_ids_BT),
                                   jnp.asarray(segment_ids_BT)))


class RewardModelGold:
  """A Hugging Face LlamaForSequenceClassification checkpoint as a gold-reward callable."""

  def __init__(self, path_or_hub_id: str, model_config, mesh):
    from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
    self.backbone, self.head = hf.load_reward_model(path_or_hub_id, model_config, mesh)

  def __call__(self, prompts, responses, lengths) -> np.ndarray:
    seqs = [list(p) + list(r[:n]) for p, r, n in zip(prompts, np.asarray(responses), lengths)]
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
      ids[i, :len(s)], seg[i, :len(s)] = s, 1
    return reward_scores(self.backbone, self.head, ids, seg)[:, 0]


def import_callable(spec: str) -> GoldFn:
  """'package.module:function' -> the function (a user's gold reward)."""
  import importlib  # pylint: disable=g-import-not-at-top
  module, _, name = spec.partition(':')
  if not module or not name:
    raise UserError(f"the gold reward {spec!r} must look like 'package.module:function'")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise UserError(f'cannot import the gold reward {spec!r} ({e}); check the module path and '
                     'that it is importable from the current directory') from e


def read_prompts(path: str, limit: int) -> list[list[int]]:
  """Prompt token ids from a JSONL file (`prompt_ids`, or `prompt_tokens` as written by
  `python -m isdaa_jax.data --dump`); the first `limit` rows (0 = all)."""
  prompts = []
  try:
    with open(path) as fh:
      for number, line in enumerate(fh, start=1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise UserError(f'line {number} of the prompts file {path} is not JSON ({e.msg}); '
                            'fix it or write the file with python -m isdaa_jax.data --dump') from None
          ids = row.get('prompt_ids', row.get('prompt_tokens')) if isinstance(row, dict) else None
          if not isinstance(ids, list):
            raise UserError(f'line {number} of the prompts file {path} has no `prompt_ids` (a '
                            'list of token ids); write one with python -m isdaa_jax.data --dump')
          prompts.append(ids)
  except FileNotFoundError:
    raise MissingFileError(f'the prompts file {path} does not exist; write one with python -m '
                    'isdaa_jax.data --dump (in training: or set config.sample_eval.every=0)'
                    ) from None
  return prompts[:limit] if limit else prompts


def gold_fn_from_config(sample_config, model_config, mesh) -> GoldFn:
  """The gold reward named by `config.sample_eval`: exactly one of `gold` (a callable) and
  `reward_model` (a checkpoint)."""
  if bool(sample_config.gold) == bool(sample_config.reward_model):
    raise UserError('give exactly one gold reward: config.sample_eval.gold (--gold, '
                    'package.module:function) or config.sample_eval.reward_model (--reward_model, '
                    'a folder or hub id)')
  if sample_config.gold:
    return import_callable(sample_config.gold)
  return RewardModelGold(sample_config.reward_model, model_config, mesh)


def training_hook(sample_config, model_config, graphdef, reference_params, mesh):
  """(every, hook) for `train.run`: logs sample/kl, sample/gold, sample/win_rate, ... ."""
  gold_fn = gold_fn_from_config(sample_config, model_config, mesh)
  prompts = read_prompts(sample_config.prompts, sample_config.num_prompts)
  params = sample.SamplingParams.from_config(sample_config)
  reference = nnx.merge(graphdef, reference_params)
  key = jax.random.key(sample_config.seed)
  # Step hooks fold in step numbers >= 0; the reference samples take their own stream.
  ref_samples = sample.generate(reference, prompts, jax.random.split(key)[1], params)

  def hook(step, policy):
    res = evaluate(policy, reference, prompts, jax.random.fold_in(key, step), params, gold_fn,
                   reference_samples=ref_samples)
    return {f'sample/{k}': v for k, v in res.as_dict().items()}

  return sample_config.every, hook


# ------------------------------------------------------------------------------------------------
# `python -m isdaa_jax.evaluate --policy DIR --reference DIR --prompts FILE.jsonl
#     (--gold=module:fn | --reward_model=DIR) --out=OUT.json [--config=configs/hh.py ...]`

# Flags that override config.sample_eval's key of the same name when given.
_SAMPLE_FLAGS = ('gold', 'reward_model', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
                 'eos_id', 'seed')


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from isdaa_jax import defaults  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', defaults.__file__, 'Config file whose model (dtypes, attention), mesh and '
      'sample_eval (sampling, gold reward) sections apply.', lock_config=True)
  flags.DEFINE_string('policy', None, 'Policy: Hugging Face folder, .gguf file or hub id (with '
                      '--config.model.lora.init_from=ADAPTER, that PEFT adapter merged in).',
                      required=True)
  flags.DEFINE_string('reference', None, 'Reference: folder or hub id.', required=True)
  flags.DEFINE_string('prompts', None, 'JSONL with prompt_ids per row.', required=True)
  flags.DEFINE_string('out', None, 'Where the JSON result goes.', required=True)
  flags.DEFINE_string('gold', None, 'Gold reward as package.module:function.')
  flags.DEFINE_string('reward_model', None, 'LlamaForSequenceClassification folder or hub id.')
  flags.DEFINE_integer('max_new_tokens', None, 'Longest response.')
  flags.DEFINE_float('temperature', None, 'Sampling temperature (1 keeps the KL estimate exact).')
  flags.DEFINE_integer('top_k', None, 'Top-k (0 = off).')
  flags.DEFINE_float('top_p', None, 'Top-p (1 = off).')
  flags.DEFINE_integer('eos_id', None, 'End-of-sequence token id.')
  flags.DEFINE_integer('seed', None, 'Sampling seed.')
  flags.DEFINE_integer('limit', 0, 'Use only the first N prompts (0 = all).')


def run(config, *, policy: str, reference: str, prompts_path: str, limit: int) -> dict:
  """The command: loads both models, samples and scores; returns the result with the count."""
  from isdaa_jax import policy as policy_lib, sharding  # pylint: disable=g-import-not-at-top
  from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
  s = config.sample_eval
  prompts = read_prompts(prompts_path, limit)
  mesh = sharding.make_mesh(config.mesh)
  gold_fn = gold_fn_from_config(s, config.model, mesh)
  policy_model = policy_lib.load_model(config.model, policy, mesh)
  reference_model = hf.load_model(reference, config.model, mesh)
  params = sample.SamplingParams.from_config(s)
  ref_samples = sample.generate(reference_model, prompts, jax.random.key(s.seed + 1), params)
  result = evaluate(policy_model, reference_model, prompts, jax.random.key(s.seed), params,
                    gold_fn, reference_samples=ref_samples)
  return dict(result.as_dict(), prompts=len(prompts))


def _main(argv):
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  config = f.config
  for name in _SAMPLE_FLAGS:
    if f[name].value is not None:
      config.sample_eval[name] = f[name].value
  try:
    result = run(config, policy=f.policy, reference=f.reference, prompts_path=f.prompts,
                 limit=f.limit)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  with open(f.out, 'w') as fh:
    json.dump(result, fh, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != 'prompts'}))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
