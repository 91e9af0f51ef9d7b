"""isdaa-jax against TRL's DPOTrainer: same model, same pairs, same loss, one invocation.

  python benchmarks/compare_trl.py [--steps=12 --warmup=2] [--venv=~/.cache/isdaa-jax/trl-venv]

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
model and trains the same pairs, in this process: the reference model in the step (the same work
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
import train_step

from isdaa_jax import config as config_lib
from isdaa_jax import defaults

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 8192, 256, 688, 4, 8
NUM_PAIRS, PROMPT, RESPONSE, BATCH, BETA = 64, 64, 32, 8, 0.1
LEARNING_RATE = 1e-6

# The driver that runs inside TRL's environment. It receives one JSON argument file.
_TRL_DRIVER = textwrap.dedent('''\
    import json, sys, time
    import torch
    import transformers, trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              TrainerCallback)
    from trl import DPOConfig, DPOTrainer

    spec = json.load(open(sys.argv[1]))
    m = spec['model']
    words = ['<pad>', '<s>', '</s>'] + [f't{i}' for i in range(3, m['vocab_size'])]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<pad>'))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token='<s>', eos_token='</s>',
                                        pad_token='<pad>')
    text = lambda ids: ' '.join(words[i] for i in ids)
    pairs = spec['pairs']
    # Responses start with a space so that prompt + response splits into exactly their words.
    rows = [dict(prompt=text(p['prompt_ids']), chosen=' ' + text(p['chosen_ids']),
                 rejected=' ' + text(p['rejected_ids'])) for p in pairs]

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m['vocab_size'], hidden_size=m['hidden_size'],
        intermediate_size=m['intermediate_size'], num_hidden_layers=m['num_layers'],
        num_attention_heads=m['num_heads'], num_key_value_heads=m['num_heads'],
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).float()
    model.save_pretrained(spec['model_dir'])

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
            output_dir=spec['out_dir'], per_device_train_batch_size=spec['batch_size'],
            max_steps=spec['warmup'] + spec['steps'], learning_rate=spec['learning_rate'],
            lr_scheduler_type='constant', warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_beta1=0.9, adam_beta2=0.95, beta=spec['beta'], loss_type=['sigmoid'],
            precompute_ref_log_probs=precompute, logging_steps=1, save_strategy='no',
            report_to='none', use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
            seed=0, data_seed=0, disable_tqdm=True, max_length=None)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[timer])
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
                    losses=timer.losses)

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
               reference_model=run(False),
               precomputed=run(True) if spec['trl_precomputed'] else None)
    out['peak_flops_before_after'] = [peak_before, matmul_peak()]
    print(json.dumps(out))
''')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=12, help='timed steps, the same on both sides')
  p.add_argument('--warmup', type=int, default=2, help='untimed first steps on both sides')
  p.add_argument('--venv', default='~/.cache/isdaa-jax/trl-venv',
                 help="TRL's virtual environment (created when absent)")
  p.add_argument('--trl', default='trl==1.16.0', help='pip requirement for TRL')
  p.add_argument('--torch', default='torch==2.13.0', help='pip requirement for torch (CPU)')
  p.add_argument('--skip_trl_precomputed', action='store_true',
                 help="skip TRL's precomputed-reference run")
  return p.parse_args(argv)


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def ensure_venv(path: pathlib.Path, torch_req: str, trl_req: str) -> pathlib.Path:
  """The venv's python, creating the venv and installing torch, trl, transformers if needed."""
  python = path / 'bin' / 'python'
  check = [str(python), '-c', 'import torch, trl, transformers']
  if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
    return python
  log(f'creating the TRL environment in {path} (a few minutes, once)')
  path.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run([sys.executable, '-m', 'venv', str(path)], check=True)
  install = subprocess.run([str(python), '-m', 'pip', 'install', '-q', torch_req, trl_req,
                            'transformers'], capture_output=True, text=True)
  if install.returncode or subprocess.run(check, capture_output=True).returncode:
    raise SystemExit(f'could not install {torch_req} {trl_req} transformers into {path}: '
                     f'{install.stderr.strip().splitlines()[-1:]}; fix the install (or remove '
                     f'{path}) and rerun')
  return python


def run_trl(python: pathlib.Path, pairs, workdir: pathlib.Path, args) -> dict:
  spec = dict(model=dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_layers=LAYERS, num_heads=HEADS),
              pairs=pairs, batch_size=BATCH, beta=BETA, learning_rate=LEARNING_RATE,
              warmup=args.warmup, steps=args.steps, model_dir=str(workdir / 'model'),
              trl_precomputed=not args.skip_trl_precomputed,
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


def isdaa_config(model_dir: pathlib.Path, overrides: dict):
  config = defaults.get_config()
  config.model.path = str(model_dir)
  config.data.batch_size = BATCH
  config.loss.name = 'dpo'
  config.loss.beta = BETA
  o = config.optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio = LEARNING_RATE, 0, 1.0  # constant, as TRL
  o.b1, o.b2, o.weight_decay, o.grad_clip_norm = 0.9, 0.95, 0.0, 1.0
  config.train.num_steps = 1000
  return config_lib.apply_overrides(config, overrides)


def main(argv=None):
  args = parse_args(argv)
  pairs = train_step.synthetic_pairs(NUM_PAIRS, PROMPT, RESPONSE, VOCAB, seed=0)
  python = ensure_venv(pathlib.Path(args.venv).expanduser(), args.torch, args.trl)
  with tempfile.TemporaryDirectory(prefix='compare_trl_') as tmp:
    workdir = pathlib.Path(tmp)
    log('TRL DPOTrainer ...')
    trl = run_trl(python, pairs, workdir, args)
    pair_tokens = sum(train_step.pair_tokens(p) for p in pairs) / len(pairs)
    timed_pairs = BATCH * args.steps
    results = {}
    fast = {'train.reference': 'precomputed', 'data.prefix_sharing': True}
    seq_len = PROMPT + RESPONSE
    variants = (('isdaa', {}), ('isdaa_precomputed', {'train.reference': 'precomputed'}),
                ('isdaa_fast', fast))
    for name, overrides in variants:
      log(f'{name} {overrides} ...')
      config = isdaa_config(workdir / 'model', overrides)
      results[name] = train_step.benchmark(config, pairs, seq_len=seq_len, steps=args.steps,
                                           warmup=args.warmup, name=name)
      print(json.dumps(results[name]), flush=True)
  print(json.dumps(dict(trl=trl)), flush=True)

  trl_s = trl['reference_model']['seconds']
  trl_pre_s = trl['precomputed']['seconds'] if trl['precomputed'] else float('nan')
  # The machine may be shared: each side's best float32 2048^3 matmul rate, measured around its
  # own runs, says how much of the CPU it had.
  trl_peak = max(trl['peak_flops_before_after'])
  trl_steps = trl['reference_model']['step_seconds'][args.warmup:]
  isdaa_peak = max(results['isdaa']['peak_flops_before_after'])
  summary = dict(
      trl_pairs_per_s=timed_pairs / trl_s,
      isdaa_pairs_per_s=results['isdaa']['pairs_per_s'],
      ratio=results['isdaa']['pairs_per_s'] * trl_s / timed_pairs,
      isdaa_fast_pairs_per_s=results['isdaa_fast']['pairs_per_s'],
      fast_ratio=results['isdaa_fast']['pairs_per_s'] * trl_s / timed_pairs,
      fast_variant=fast,
      trl_precomputed_pairs_per_s=timed_pairs / trl_pre_s,
      isdaa_precomputed_pairs_per_s=results['isdaa_precomputed']['pairs_per_s'],
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
      first_loss=dict(trl=trl['reference_model']['losses'][0],
                      isdaa=results['isdaa']['losses'][0]),
      steps=args.steps, warmup=args.warmup,
      versions=dict(trl=trl['trl'], torch=trl['torch'], transformers=trl['transformers'],
                    torch_threads=trl['torch_threads']),
  )
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  main()
