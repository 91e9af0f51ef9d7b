"""Throughput of the jitted IS-DAA train step, one JSON line per variant and a summary line.

  python benchmarks/train_step.py                       # every variant, the TRL-comparison model
  python benchmarks/train_step.py --variants=baseline,precomputed --batch_size=16
  python benchmarks/train_step.py --preset=llama3.2-1b --batch_size=8 --prompt_length=512 \
      --response_length=256 --variants=precomputed_remat_dots_bf16,prefix_shared_precomputed \
      --set=model.dtype=bfloat16 --set=model.attention=cudnn --set=model.remat=dots   # on a GPU

Each variant runs in a subprocess of its own (so its peak host memory is its own) that drives
`isdaa_jax.train`'s jitted step directly on fixed synthetic pairs: the compile and `--warmup`
steps are excluded, then `--steps` steps are timed, each waited for (a step's time includes
collating its batch on the host and sending it to the device). Per variant it reports
pairs/s; tokens/s counted as TRL does (prompt+chosen plus prompt+rejected, padding excluded);
the tokens the model actually ran (fewer with prefix sharing); step time; model FLOP/s
(6N per processed token for the policy's forward+backward, 4N with LoRA, 2N more for an in-step
reference, N = the parameters that enter matmuls; attention scores not counted); MFU against the
best FLOP/s of a large matmul in the variant's compute dtype, measured on the same device in the same process
before and after the steps; peak host memory (getrusage) and XLA's memory plan of the step
(and the device's peak bytes in use where the platform reports it).
"""

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from isdaa_jax import config as config_lib
from isdaa_jax import defaults, host_memory, scoring, sharding, throughput, train
from isdaa_jax import layout as layout_lib
from isdaa_jax.data import collate, pipeline, prefix
from isdaa_jax.model.llama import LlamaConfig

# name -> config overrides on top of the baseline (frozen reference model in the step, chunked
# log-probs, no remat, float32 everywhere).
VARIANTS = {
    'baseline': {},
    'precomputed': {'train.reference': 'precomputed'},
    'full_logits': {'model.logprob_chunk_size': 0},
    'remat_full': {'model.remat': 'full'},
    'remat_dots': {'model.remat': 'dots'},
    'bfloat16': {'model.dtype': 'bfloat16'},
    'blocked_attention': {'model.attention': 'blocked'},
    'precomputed_remat_dots_bf16': {'train.reference': 'precomputed', 'model.remat': 'dots',
                                    'model.dtype': 'bfloat16'},
}
VARIANTS['prefix_shared'] = {'data.prefix_sharing': True}
VARIANTS['prefix_shared_precomputed'] = {'data.prefix_sharing': True,
                                         'train.reference': 'precomputed'}
# Packing pays only when lengths vary: run these with --length_spread (e.g. 0.75).
VARIANTS['packed'] = {'data.packing': True}
# LoRA on every projection: only the adapters are trained and hold Adam moments; the frozen base
# is the reference (no copy), optionally stored in bfloat16.
VARIANTS['lora_r16'] = {'model.lora.rank': 16}
VARIANTS['lora_r16_bf16_base'] = {'model.lora.rank': 16, 'model.lora.base_dtype': 'bfloat16'}
VARIANTS['packed_shared_precomputed'] = {'data.packing': True, 'data.prefix_sharing': True,
                                         'train.reference': 'precomputed'}

_MODEL_FLAGS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                'num_kv_heads', 'head_dim')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--variants', default=','.join(VARIANTS),
                 help=f'comma-separated, from: {", ".join(VARIANTS)}')
  p.add_argument('--preset', default='', help='a LlamaConfig preset; overrides the shape flags')
  # Default shape: the model of benchmarks/compare_trl.py (Llama, 8192 vocab, 4 layers of 256).
  p.add_argument('--vocab_size', type=int, default=8192)
  p.add_argument('--hidden_size', type=int, default=256)
  p.add_argument('--intermediate_size', type=int, default=688)
  p.add_argument('--num_layers', type=int, default=4)
  p.add_argument('--num_heads', type=int, default=8)
  p.add_argument('--num_kv_heads', type=int, default=8)
  p.add_argument('--head_dim', type=int, default=32)
  p.add_argument('--tie_word_embeddings', action='store_true')
  p.add_argument('--batch_size', type=int, default=8, help='pairs per step')
  p.add_argument('--prompt_length', type=int, default=64)
  p.add_argument('--response_length', type=int, default=32)
  p.add_argument('--length_spread', type=float, default=0.0,
                 help='0: every prompt and response has the full length; s in (0, 1): lengths '
                      'uniform in [(1 - s) * length, length], so padding and packing differ')
  p.add_argument('--seq_len', type=int, default=0,
                 help='padded length of each side (0: prompt + response, no padding)')
  p.add_argument('--steps', type=int, default=8, help='timed steps')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after the compile')
  p.add_argument('--peak_matmul_size', type=int, default=0,
                 help='side of the square matmul that measures the peak (0: 2048 on CPU, 8192 '
                      'on accelerators)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help="config override applied to every variant before its own, e.g. "
                      "--set=model.attention=cudnn (repeatable; values parsed as Python literals)")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--in_process', action='store_true',
                 help='run the variants in this process (host memory then accumulates)')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def synthetic_pairs(n: int, prompt_length: int, response_length: int, vocab_size: int,
                    seed: int, spread: float = 0.0) -> list[dict]:
  """Pairs of the given lengths (each uniform in [(1 - spread) * length, length] when spread > 0);
  token ids avoid 0-2 (pad, BOS, EOS) and responses end with EOS."""
  rng = np.random.default_rng(seed)
  size = lambda full: int(rng.integers(max(1, round((1 - spread) * full)), full + 1))
  pairs = []
  for _ in range(n):
    pairs.append(dict(
        prompt_ids=[1] + rng.integers(3, vocab_size, size(prompt_length) - 1).tolist(),
        chosen_ids=rng.integers(3, vocab_size, size(response_length) - 1).tolist() + [2],
        rejected_ids=rng.integers(3, vocab_size, size(response_length) - 1).tolist() + [2]))
  return pairs


def _parse_sets(sets) -> dict:
  out = {}
  for item in sets:
    key, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'--set={item!r} is not KEY=VALUE; write e.g. --set=model.remat=dots')
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # a bare string such as cudnn
  return out


def make_config(args, overrides: dict):
  config = defaults.get_config()
  m = config.model
  if args.preset:
    m.preset = args.preset
  else:
    for name in _MODEL_FLAGS:
      m[name] = getattr(args, name)
    m.tie_word_embeddings = args.tie_word_embeddings
  m.max_position_embeddings = max(m.max_position_embeddings,
                                  2 * (args.prompt_length + args.response_length))
  config.data.batch_size = args.batch_size
  config.train.num_steps = args.warmup + args.steps + 1
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-6
  config.seed = args.seed
  return config_lib.apply_overrides(config, {**_parse_sets(args.set), **overrides})


def matmul_params(cfg: LlamaConfig) -> int:
  """Parameters that enter a matmul per token: all but the norms and an untied input table."""
  d, l = cfg.hidden_size, cfg.num_layers
  norms = 2 * l * d + d
  lookup_only = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
  return cfg.num_params() - norms - lookup_only


def measure_peak_flops(dtype, n: int, reps: int = 5) -> float:
  """Best FLOP/s of an n x n x n matmul in `dtype` on the default device."""
  x = jnp.ones((n, n), dtype)
  return 2 * n**3 / _best_seconds(lambda a: a @ a, x, reps=reps)


def gemm_ceiling_flops(cfg: LlamaConfig, rows: int, reference_in_step: bool, dtype) -> float:
  """FLOP/s of the step's own weight matmuls, each timed alone at its shape: the rate the step
  would run at if nothing but its GEMMs took time (on a CPU, small-K and wide-N shapes run well
  below the square-matmul peak). `rows` = tokens per forward, padding included."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  layer = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
  total_flops, total_s = 0.0, 0.0
  for (k, n), count in [((k, n), cfg.num_layers) for k, n in layer] + [((d, v), 1)]:
    x, w, y = (jnp.ones(shape, dtype) for shape in ((rows, k), (k, n), (rows, n)))
    timings = [_best_seconds(lambda a, b: a @ b, x, w),       # forward
               _best_seconds(lambda a, b: a @ b.T, y, w),     # gradient of the input
               _best_seconds(lambda a, b: a.T @ b, x, y)]     # gradient of the weight
    passes = timings + ([timings[0]] if reference_in_step else [])
    total_s += count * sum(passes)
    total_flops += count * len(passes) * 2 * rows * k * n
  return total_flops / total_s


def _best_seconds(fn, *args, reps: int = 5) -> float:
  f = jax.jit(fn)
  f(*args).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    f(*args).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def device_peak_bytes():
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def pair_tokens(pair) -> int:
  """Tokens of a pair as TRL counts them: prompt+chosen plus prompt+rejected."""
  return 2 * len(pair['prompt_ids']) + len(pair['chosen_ids']) + len(pair['rejected_ids'])


def pipeline_shapes(config, pairs, seq_len: int, real_buckets: tuple[int, ...] = ()):
  """Sets `config.data` so that the run's batches take the shapes the training pipeline gives
  them; returns the layout and the collate arguments the pipeline passes.

  Synthetic pairs (no `real_buckets`): unshared rows of `seq_len`, shared rows padded as much as
  the unshared ones (none at the default --seq_len), packed rows of either length. Real pairs:
  their buckets. As in the pipeline, a padded batch takes the bucket of its longest pair and a
  packed batch the rows its pairs need, so a run may have several shapes (each compiled before
  the timed steps)."""
  data = config.data
  if not real_buckets:
    shared_len = (max(map(prefix.shared_length, pairs)) + seq_len
                  - max(map(collate.pair_length, pairs)))
    data.length_buckets = (seq_len, shared_len)
    if data.packing and not data.pack_length:
      data.pack_length = shared_len if data.prefix_sharing else seq_len
  layout = layout_lib.from_config(data)
  return layout, dict(micro_batches=config.optimizer.grad_accum_steps)


def _shape_key(batch) -> tuple:
  return tuple(sorted((k, v.shape) for k, v in batch.items()))


def benchmark(config, pairs, *, seq_len: int, steps: int, warmup: int, peak_matmul_size: int = 0,
              name: str = '', buckets: tuple[int, ...] = ()) -> dict:
  """Trains `warmup + steps` steps on `pairs` (cycled, `config.data.batch_size` a step) and
  measures the last `steps`. Each step collates its pairs on the host, as the pipeline does."""
  # The host allocator as the entry points set it (distributed.initialize), before JAX starts.
  host_memory.configure(config.distributed.host_malloc)
  mesh = sharding.make_mesh(config.mesh)
  b = config.data.batch_size
  if len(pairs) % b:
    raise ValueError(f'{len(pairs)} pairs do not split into batches of {b}')
  layout, shape_args = pipeline_shapes(config, pairs, seq_len, buckets)
  run_setup = train.setup(config, mesh)
  assert run_setup.step.layout == layout
  model_cfg = run_setup.model_cfg
  params, reference, base = train.load_start(config, run_setup)
  reference_seconds = None
  if config.train.reference == 'precomputed':
    # The reference is the starting policy: its log-probs are computed once, before training,
    # as the cached-reference pre-pass computes them.
    start = time.perf_counter()
    scores = scoring.score_pairs(nnx.merge(run_setup.base_graphdef, base), pairs, mesh,
                                 layout=layout, batch_size=b,
                                 chunk_size=config.model.logprob_chunk_size, progress=False)
    pairs = [dict(p, reference_chosen_logps=float(w), reference_rejected_logps=float(l))
             for p, w, l in zip(pairs, scores.chosen_logps, scores.rejected_logps)]
    reference_seconds = time.perf_counter() - start
  batch_pairs = [pairs[i:i + b] for i in range(0, len(pairs), b)]
  state = run_setup.init_state(params)
  del params, base
  # One executable per batch shape, all compiled before the timed steps (as jit would on the
  # first batch of each shape); the largest shape's is the one analysed.
  collated = [layout.collate(chunk, **shape_args) for chunk in batch_pairs]
  first = max(collated, key=layout.row_tokens)
  step_fns, compile_seconds = {}, []
  for batch in [first] + collated:
    if _shape_key(batch) not in step_fns:
      start = time.perf_counter()
      step_fns[_shape_key(batch)] = run_setup.train_step.lower(
          state, reference, sharding.global_batch(batch, mesh)).compile()
      compile_seconds.append(time.perf_counter() - start)
  del collated
  step_fn = step_fns[_shape_key(first)]
  memory = step_fn.memory_analysis()
  cost = step_fn.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  peak_n = peak_matmul_size or (2048 if jax.default_backend() == 'cpu' else 8192)
  compute_dtype = jnp.dtype(model_cfg.compute_dtype)
  peak_before = measure_peak_flops(compute_dtype, peak_n)
  times, losses, tokens, row_tokens = [], [], [], []
  for i in range(warmup + steps):
    chunk = batch_pairs[i % len(batch_pairs)]
    start = time.perf_counter()
    batch = layout.collate(chunk, **shape_args)
    state, metrics = step_fns[_shape_key(batch)](state, reference,
                                                 sharding.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))  # waits for the step
    times.append(time.perf_counter() - start)
    tokens.append((sum(pair_tokens(p) for p in chunk), int(layout.real_tokens(batch))))
    row_tokens.append(int(layout.row_tokens(batch)))
  peak_after = measure_peak_flops(compute_dtype, peak_n)
  rows_per_forward = layout.row_tokens(first)
  ceiling = gemm_ceiling_flops(
      model_cfg, rows_per_forward // (config.optimizer.grad_accum_steps * jax.device_count()),
      config.train.reference == 'model', compute_dtype)
  timed = np.asarray(times[warmup:])
  total_s = float(timed.sum())
  trl_tokens, run_tokens = np.asarray(tokens[warmup:]).sum(axis=0)
  n_mm = matmul_params(model_cfg)
  flops_per_token = throughput.flops_per_token(n_mm, config.train.reference,
                                                lora=bool(config.model.lora.rank))
  model_flops_s = flops_per_token * run_tokens / total_s
  peak = max(peak_before, peak_after) * jax.device_count()
  return dict(
      variant=name,
      backend=jax.default_backend(),
      device=jax.devices()[0].device_kind,
      num_devices=jax.device_count(),
      params=model_cfg.num_params(),
      matmul_params=n_mm,
      batch_pairs=b,
      layout=type(layout).__name__,
      # The model's positions per step, padding included (rows x row length), on average over
      # the timed steps, and of the largest batch shape.
      batch_row_tokens=float(np.mean(row_tokens[warmup:])),
      max_batch_row_tokens=int(layout.row_tokens(first)),
      compiled_shapes=len(step_fns),
      steps=steps,
      pairs_per_s=b * steps / total_s,
      tokens_per_s=float(trl_tokens) / total_s,
      processed_tokens_per_s=float(run_tokens) / total_s,
      step_s=total_s / steps,
      step_s_median=float(np.median(timed)),
      step_s_min=float(timed.min()),
      compile_s=compile_seconds[0],  # the largest shape's
      compile_s_all_shapes=float(sum(compile_seconds)),
      reference_pass_s=reference_seconds,
      model_flops_per_token=flops_per_token,
      model_flops_per_s=model_flops_s,
      xla_flops_per_step=cost.get('flops') if cost else None,
      peak_flops_per_s=peak,
      peak_flops_before_after=[peak_before, peak_after],
      mfu=model_flops_s / peak,
      gemm_ceiling_flops_per_s=ceiling,
      mfu_vs_gemm_ceiling=model_flops_s / (ceiling * jax.device_count()),
      host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      step_temp_bytes=memory.temp_size_in_bytes if memory else None,
      step_argument_bytes=memory.argument_size_in_bytes if memory else None,
      device_peak_bytes=device_peak_bytes(),
      losses=losses,
  )


def run_variant(args, name: str) -> dict:
  config = make_config(args, VARIANTS[name])
  vocab = (LlamaConfig.preset(args.preset).vocab_size if args.preset
           else config.model.vocab_size)
  buckets = ()
  if config.data.source == 'synthetic':
    pairs = synthetic_pairs(4 * args.batch_size, args.prompt_length, args.response_length, vocab,
                            args.seed, args.length_spread)
    seq_len = args.seq_len or args.prompt_length + args.response_length
  else:  # real pairs (--set=data.source=hh --set=data.path=... --set=data.tokenizer=...)
    store = pipeline.load(config.data, model_path=config.model.path, vocab_size=vocab).train
    order = np.random.default_rng(args.seed).permutation(len(store))
    pairs = [store[int(i)] for i in order[:4 * args.batch_size]]
    buckets = tuple(config.data.length_buckets)
    seq_len = args.seq_len or collate.bucket_for(max(map(collate.pair_length, pairs)), buckets)
  result = benchmark(config, pairs, seq_len=seq_len, steps=args.steps, warmup=args.warmup,
                     peak_matmul_size=args.peak_matmul_size, name=name, buckets=buckets)
  result['overrides'] = VARIANTS[name]
  return result


def _child_argv(args) -> list[str]:
  out = []
  for key, value in vars(args).items():
    if key in ('variants', 'child', 'in_process'):
      continue
    if isinstance(value, bool):
      out += [f'--{key}'] if value else []
    elif isinstance(value, list):
      out += [f'--{key}={v}' for v in value]
    else:
      out.append(f'--{key}={value}')
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(json.dumps(run_variant(args, args.child)), flush=True)
    return
  _parse_sets(args.set)  # a malformed --set fails here, once
  names = [v for v in args.variants.split(',') if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    raise SystemExit(f'unknown variant(s) {", ".join(unknown)}; choose from {", ".join(VARIANTS)}')
  results = []
  for name in names:
    if args.in_process:
      result = run_variant(args, name)
    else:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *_child_argv(args),
                             f'--child={name}'], capture_output=True, text=True, check=False)
      lines = proc.stdout.strip().splitlines()
      if proc.returncode or not lines:
        result = dict(variant=name, error=proc.stderr.strip().splitlines()[-5:])
      else:
        result = json.loads(lines[-1])
    results.append(result)
    print(json.dumps(result), flush=True)
  ok = [r for r in results if 'error' not in r]
  base_pairs = next((r['pairs_per_s'] for r in ok if r['variant'] == 'baseline'), None)
  summary = {r['variant']: dict(pairs_per_s=round(r['pairs_per_s'], 3),
                                tokens_per_s=round(r['tokens_per_s'], 1),
                                mfu=round(r['mfu'], 4),
                                mfu_vs_gemm_ceiling=round(r['mfu_vs_gemm_ceiling'], 4),
                                step_temp_bytes=r['step_temp_bytes'],
                                vs_baseline=round(r['pairs_per_s'] / base_pairs, 3)
                                if base_pairs else None)
             for r in ok}
  print(json.dumps(dict(summary=summary, failed=[r['variant'] for r in results if 'error' in r])),
        flush=True)


if __name__ == '__main__':
  main()
