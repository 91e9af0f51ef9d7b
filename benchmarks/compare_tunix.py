"""isdaa-jax against Google Tunix's DPOTrainer, on compare_trl's workloads.

  python benchmarks/compare_tunix.py [--steps=12 --warmup=2]                 # synthetic model
  python benchmarks/compare_tunix.py --model=smollm2 [--steps=4 --warmup=1]  # SmolLM2, real HH

`--model=synthetic` (the default) is compare_trl's synthetic workload: the same Llama (vocab
8192, hidden 256, intermediate 688, 4 layers, 8 heads, untied, float32; initialized here by
isdaa-jax with a fixed seed and saved as a Hugging Face folder that both sides load) and the same
64 synthetic pairs (prompt 64, responses 32). `--model=smollm2` is compare_trl's real-scale one
(benchmarks/real_workload.py): the SmolLM2 GGUF converted once into a Hugging Face folder, the
first 64 HH-RLHF harmless-base test pairs tokenized once (max length 256); Tunix's step of 8
pairs needs more than this 24 GiB machine holds there (killed by the kernel at 23 GiB RSS on
2026-12-03), and fits in 14 GiB with `--grad_accum=4` (both sides then step over 4 micro-batches
of 2 pairs). Both: batch 8, DPO sigmoid loss with beta 0.1, AdamW at a constant learning rate
with gradient clipping at 1.0, float32.

Tunix runs first, in a virtual environment of its own created on first use (`google-tunix`
with the jax/flax pair isdaa-jax uses), driven by a generated script in a subprocess: its
`tunix.models.llama3` model loads the folder's safetensors (a ModelConfig built from its
config.json: plain RoPE, tied embeddings), and `tunix.sft.dpo.DPOTrainer` trains it with the
frozen reference model on the very same token ids, given as its `TrainingInput` (prompts
left-padded to the longest prompt, responses right-padded to the longest response, one shape for
every batch). isdaa-jax then runs the same pairs in a process per variant (compare_trl's
variants). Only the last `steps` steps are timed on both sides; both sync on the loss every step.
Tunix reports a step's loss one step late, part-way through the next step, so its rate is taken
over the `steps - 1` whole gaps between those reports (the last gap holds only part of a step).

The last output line is one JSON object: `tunix_pairs_per_s`, `isdaa_pairs_per_s`, `ratio`,
`isdaa_fast_pairs_per_s`, `fast_ratio`, each side's peak RSS, compile times, matmul rates and
first-step losses (log 2 each).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap

# Run as a script, this file's folder is on sys.path: its neighbours are importable.
import compare_trl
import real_workload
import train_step

_TUNIX_DRIVER = textwrap.dedent('''\
    import json, resource, sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    import tunix
    from tunix.models.llama3 import model as llama_lib, params as llama_params
    from tunix.sft import hooks
    from tunix.sft.dpo import dpo_trainer

    spec = json.load(open(sys.argv[1]))
    hf = json.load(open(spec['model_dir'] + '/config.json'))
    cfg = llama_lib.ModelConfig(
        num_layers=hf['num_hidden_layers'], vocab_size=hf['vocab_size'],
        embed_dim=hf['hidden_size'], hidden_dim=hf['intermediate_size'],
        num_heads=hf['num_attention_heads'], head_dim=hf['head_dim'],
        num_kv_heads=hf['num_key_value_heads'],
        rope_theta=hf.get('rope_theta') or hf['rope_parameters']['rope_theta'],
        norm_eps=hf['rms_norm_eps'], weight_tying=hf['tie_word_embeddings'])
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((1, 1), ('fsdp', 'tp'), axis_types=(auto, auto))

    def load():
        return llama_params.create_model_from_safe_tensors(spec['model_dir'], cfg, mesh,
                                                           dtype=jnp.float32)

    pairs, pad = spec['pairs'], spec['pad_id']
    P = max(len(p['prompt_ids']) for p in pairs)
    R = max(max(len(p['chosen_ids']), len(p['rejected_ids'])) for p in pairs)

    def left(rows, n):
        ids = np.full((len(rows), n), pad, np.int32)
        mask = np.zeros((len(rows), n), np.int32)
        for i, r in enumerate(rows):
            ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
        return ids, mask

    def right(rows, n):
        ids = np.full((len(rows), n), pad, np.int32)
        mask = np.zeros((len(rows), n), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    def batches():
        # With accumulation each step's batch arrives as `grad_accum` micro-batches.
        b, accum = spec['batch_size'], spec['grad_accum']
        micro = b // accum
        for step in range(spec['warmup'] + spec['steps']):
            for k in range(accum):
                start = (step * b + k * micro) % len(pairs)
                chunk = pairs[start:start + micro]
                prompt_ids, prompt_mask = left([p['prompt_ids'] for p in chunk], P)
                chosen_ids, chosen_mask = right([p['chosen_ids'] for p in chunk], R)
                rejected_ids, rejected_mask = right([p['rejected_ids'] for p in chunk], R)
                yield dpo_trainer.TrainingInput(
                    prompt_ids=prompt_ids, prompt_mask=prompt_mask, chosen_ids=chosen_ids,
                    chosen_mask=chosen_mask, rejected_ids=rejected_ids,
                    rejected_mask=rejected_mask)

    class Timer(hooks.TrainingHooks):
        def __init__(self):
            self.ends, self.losses = [], []
        def on_train_start(self, ctx): pass
        def on_train_end(self, ctx): pass
        def on_train_step_start(self, ctx): pass
        def on_train_step_end(self, ctx, train_step, train_loss):
            # Called after the step's metrics were pulled from the device.
            self.losses.append(float(train_loss))
            self.ends.append(time.perf_counter())
        def on_eval_step_start(self, ctx): pass
        def on_eval_step_end(self, ctx, eval_loss): pass

    def matmul_peak(n=2048, reps=5):
        x = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(x).block_until_ready()
        best = float('inf')
        for _ in range(reps):
            start = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return 2 * n ** 3 / best

    peak_before = matmul_peak()
    with mesh:
        policy, reference = load(), load()
        optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(spec['learning_rate'], b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
        config = dpo_trainer.DPOTrainingConfig(
            eval_every_n_steps=10 ** 9, max_steps=spec['warmup'] + spec['steps'],
            gradient_accumulation_steps=spec['grad_accum'] if spec['grad_accum'] > 1 else None,
            beta=spec['beta'], label_smoothing=0.0, pbar_description=None)
        trainer = dpo_trainer.DPOTrainer(policy, reference, optimizer, config)
        timer = Timer()
        trainer.with_training_hooks(timer)
        start = time.perf_counter()
        trainer.train(batches())
    ends = [start] + timer.ends
    out = dict(tunix=getattr(tunix, '__version__', 'unknown'), jax=jax.__version__,
               step_seconds=[b - a for a, b in zip(ends, ends[1:])], losses=timer.losses,
               first_step_s=ends[1] - ends[0], prompt_length=P, response_length=R,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               peak_flops_before_after=[peak_before, matmul_peak()])
    print(json.dumps(out))
''')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', choices=('synthetic', 'smollm2'), default='synthetic',
                 help="compare_trl's synthetic model or SmolLM2-135M on real HH pairs")
  p.add_argument('--steps', type=int, default=None,
                 help='timed steps, the same on both sides (default 12 synthetic, 4 smollm2)')
  p.add_argument('--warmup', type=int, default=None,
                 help='untimed first steps on both sides (default 2 synthetic, 1 smollm2)')
  real_workload.add_flags(p)
  p.add_argument('--venv', default='~/.cache/isdaa-jax/tunix-venv',
                 help="Tunix's virtual environment (created when absent)")
  p.add_argument('--tunix', default='google-tunix==0.1.7', help='pip requirement for Tunix')
  p.add_argument('--jax', default='jax==0.10.2 flax==0.12.8',
                 help="pip requirements pinning Tunix's jax and flax (isdaa-jax's pair)")
  # The SmolLM2 workload fits Tunix in 24 GiB only with 4.
  compare_trl.add_grad_accum_flag(p, 'Tunix: gradient_accumulation_steps')
  p.add_argument('--variants', default='isdaa,isdaa_precomputed,isdaa_fast',
                 help="isdaa-jax runs, from compare_trl's variants of the --model")
  args = p.parse_args(argv)
  if args.steps is not None and args.steps < 2:
    p.error("--steps must be at least 2: Tunix's last step is not timed whole (see summarize)")
  compare_trl.check_grad_accum(p, args)
  real = args.model == 'smollm2'
  if args.steps is None:
    args.steps = 4 if real else 12
  if args.warmup is None:
    args.warmup = 1 if real else 2
  return args


def save_synthetic_model(model_dir: pathlib.Path) -> None:
  """compare_trl's synthetic Llama, initialized by isdaa-jax (seed 0), as a Hugging Face folder."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from isdaa_jax.model import hf  # pylint: disable=g-import-not-at-top
  from isdaa_jax.model.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
  cfg = LlamaConfig(vocab_size=compare_trl.VOCAB, hidden_size=compare_trl.HIDDEN,
                    intermediate_size=compare_trl.INTERMEDIATE,
                    num_layers=compare_trl.LAYERS, num_heads=compare_trl.HEADS,
                    num_kv_heads=compare_trl.HEADS,
                    head_dim=compare_trl.HIDDEN // compare_trl.HEADS, rms_norm_eps=1e-6,
                    max_position_embeddings=512)
  hf.save_model(Llama(cfg, rngs=nnx.Rngs(0)), str(model_dir),
                extra_config=dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))


def run_tunix(python: pathlib.Path, pairs, model_dir: pathlib.Path, workdir: pathlib.Path,
              args) -> dict:
  pad_id = json.loads((model_dir / 'config.json').read_text())['pad_token_id']
  spec = dict(model_dir=str(model_dir), pairs=pairs, pad_id=pad_id,
              batch_size=compare_trl.BATCH, beta=compare_trl.BETA,
              learning_rate=compare_trl.LEARNING_RATE, warmup=args.warmup, steps=args.steps,
              grad_accum=args.grad_accum)
  (workdir / 'tunix_spec.json').write_text(json.dumps(spec))
  (workdir / 'tunix_driver.py').write_text(_TUNIX_DRIVER)
  # The driver must not see this process's packages (isdaa-jax's own jax would shadow Tunix's).
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONWARNINGS='ignore')
  proc = subprocess.run([str(python), str(workdir / 'tunix_driver.py'),
                         str(workdir / 'tunix_spec.json')], capture_output=True, text=True,
                        env=env, cwd=workdir)
  if proc.returncode:
    raise SystemExit('the Tunix run failed:\n' + '\n'.join(proc.stderr.splitlines()[-30:]))
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(tunix: dict, results: dict, pairs: list, args) -> dict:
  """The last output line: rates and ratios from Tunix's driver output and isdaa-jax's runs."""
  # Tunix logs a step's metrics one step late (to overlap them with the next step), so its hook
  # for step k fires once step k+1's first micro-batches have run: the gaps between hooks are
  # whole steps, but the last gap (the flush in `close`) holds only the rest of the final step.
  # Only the whole gaps are counted (before 2026-12-03 the flush was, overstating Tunix's rate).
  tunix_steps = tunix['step_seconds'][args.warmup:-1]
  timed_pairs = compare_trl.BATCH * len(tunix_steps)
  tunix_seconds = sum(tunix_steps)
  tunix_pairs_s = timed_pairs / tunix_seconds
  tunix_peak = max(tunix['peak_flops_before_after'])
  isdaa = results['isdaa']
  # Tunix's steps get faster over its first steps (163 s -> 87 s on SmolLM2): the median of the
  # later half of its whole steps against isdaa-jax's median step is the steady-state ratio.
  tunix_steady_s = statistics.median(tunix_steps[len(tunix_steps) // 2:])
  pair_tokens = sum(train_step.pair_tokens(p) for p in pairs) / len(pairs)
  return dict(
      model=args.model,
      tunix_pairs_per_s=tunix_pairs_s,
      isdaa_pairs_per_s=isdaa['pairs_per_s'],
      ratio=isdaa['pairs_per_s'] / tunix_pairs_s,
      tunix_best_step_pairs_per_s=compare_trl.BATCH / min(tunix_steps),
      best_step_ratio=min(tunix_steps) / isdaa['step_s_min'],
      tunix_step_seconds=tunix_steps,
      tunix_steady_pairs_per_s=compare_trl.BATCH / tunix_steady_s,
      steady_ratio=tunix_steady_s / isdaa['step_s_median'],
      tunix_tokens_per_s=timed_pairs * pair_tokens / tunix_seconds,
      isdaa_tokens_per_s=isdaa['tokens_per_s'],
      tunix_row_length=tunix['prompt_length'] + tunix['response_length'],
      tunix_first_step_s=tunix['first_step_s'],
      tunix_peak_rss_bytes=tunix['peak_rss_bytes'],
      tunix_matmul_flops_per_s=tunix_peak,
      isdaa_matmul_flops_per_s=max(isdaa['peak_flops_before_after']),
      ratio_per_matmul_peak=isdaa['pairs_per_s'] / max(isdaa['peak_flops_before_after'])
      / (tunix_pairs_s / tunix_peak),
      isdaa_peak_rss_bytes={n: r['host_peak_rss_bytes'] for n, r in results.items()},
      isdaa_compile_s={n: r['compile_s'] for n, r in results.items()},
      isdaa_pairs_per_s_by_variant={n: r['pairs_per_s'] for n, r in results.items()},
      ratio_by_variant={n: r['pairs_per_s'] / tunix_pairs_s for n, r in results.items()},
      first_loss=dict(tunix=tunix['losses'][0], isdaa=isdaa['losses'][0]),
      steps=args.steps, warmup=args.warmup, grad_accum=args.grad_accum,
      versions=dict(tunix=tunix['tunix'], jax=tunix['jax']),
  )


def main(argv=None):
  args = parse_args(argv)
  real = args.model == 'smollm2'
  python = compare_trl.ensure_venv(pathlib.Path(args.venv).expanduser(),
                                   [args.tunix, *args.jax.split()], 'tunix.sft.dpo.dpo_trainer',
                                   'Tunix')
  variants = compare_trl.isdaa_variants(real=real)
  names = [v for v in args.variants.split(',') if v]
  unknown = [v for v in names if v not in variants]
  if unknown or 'isdaa' not in names:
    raise SystemExit(f'--variants must include isdaa and name only {", ".join(variants)}')
  with tempfile.TemporaryDirectory(prefix='compare_tunix_') as tmp:
    workdir = pathlib.Path(tmp)
    if real:
      model_dir = real_workload.ensure_model_dir(args.model_dir)
      pairs = real_workload.hh_pairs(model_dir, args.hh_file, compare_trl.NUM_PAIRS,
                                     real_workload.MAX_LENGTH)
      seq_len, buckets = real_workload.MAX_LENGTH, (real_workload.MAX_LENGTH,)
    else:
      model_dir = workdir / 'model'
      save_synthetic_model(model_dir)
      pairs = train_step.synthetic_pairs(compare_trl.NUM_PAIRS, compare_trl.PROMPT,
                                         compare_trl.RESPONSE, compare_trl.VOCAB, seed=0)
      seq_len, buckets = compare_trl.PROMPT + compare_trl.RESPONSE, ()
    compare_trl.log(f'Tunix DPOTrainer ({args.model}) ...')
    tunix = run_tunix(python, pairs, model_dir, workdir, args)
    print(json.dumps(dict(tunix=tunix)), flush=True)
    spec = dict(real=real, model_dir=str(model_dir), hh_file=args.hh_file, pairs=pairs,
                seq_len=seq_len, buckets=buckets, steps=args.steps, warmup=args.warmup)
    results = {}
    for name in names:
      compare_trl.log(f'{name} {variants[name]} ...')
      overrides = compare_trl.with_grad_accum(variants[name], args.grad_accum)
      results[name] = compare_trl.run_isdaa(name, overrides, spec, workdir)
      print(json.dumps(results[name]), flush=True)

  summary = summarize(tunix, results, pairs, args)
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  main()
