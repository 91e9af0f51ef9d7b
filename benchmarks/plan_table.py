"""The README's TPU planning table: `isdaa_jax.plan` for Llama presets on a few slices.

  python benchmarks/plan_table.py --results_dir=benchmarks/results \
      --cases=llama3.2-1b/v5p-8/model,llama3.1-8b/v5p-8/model/lora16
  python benchmarks/plan_table.py --results_dir=benchmarks/results --markdown

A case is MODEL/SLICE/REFERENCE[/loraR]. Each compiled case is written at once as
RESULTS_DIR/plan_MODEL_SLICE_REFERENCE[_loraR].json (a Llama-3.2-1B compile takes minutes on a
2-core host, so partial progress survives) and a case whose file exists is skipped; --markdown
prints the table of every file there. The config: bfloat16 compute, float32 parameters, remat
'full', scan_layers, fsdp over every chip, --seq_len tokens per pair (half prompt), padded layout,
DPO with importance weights; max(--batch_size, chips) pairs per step (every chip needs a pair);
with loraR: LoRA rank R on every projection, the frozen base in bfloat16.
"""

import argparse
import json
import pathlib
import resource
import time

from isdaa_jax import defaults, plan, tpu_chips


def case_config(model: str, reference: str, batch_size: int, seq_len: int, remat: str,
                lora_rank: int = 0):
  config = defaults.get_config()
  m = config.model
  m.preset, m.param_dtype, m.dtype, m.remat, m.scan_layers = model, 'float32', 'bfloat16', remat, True
  if lora_rank:
    m.lora.rank, m.lora.base_dtype = lora_rank, 'bfloat16'
  d = config.data
  d.max_length, d.max_prompt_length, d.length_buckets = seq_len, seq_len // 2, (seq_len,)
  d.batch_size = batch_size
  config.loss.importance.enabled = True
  config.train.reference = reference
  return config


def parse_case(case: str) -> tuple[str, str, str, int]:
  """'llama3.1-8b/v5p-8/model/lora16' -> (model, slice, reference, lora rank)."""
  parts = case.split('/')
  if len(parts) not in (3, 4) or (len(parts) == 4 and not parts[3].startswith('lora')):
    raise SystemExit(f'case {case!r} is not MODEL/SLICE/REFERENCE[/loraR]')
  return parts[0], parts[1], parts[2], int(parts[3][4:]) if len(parts) == 4 else 0


def result_path(results_dir, model, slice_name, reference, lora_rank) -> pathlib.Path:
  lora_part = f'_lora{lora_rank}' if lora_rank else ''
  return pathlib.Path(results_dir) / f'plan_{model}_{slice_name}_{reference}{lora_part}.json'


def _gib(x, digits: int = 1) -> str:
  return f'{x / tpu_chips.GiB:.{digits}f}'


def markdown(rows) -> str:
  """The table: per-chip GiB, roofline pairs/s, compile seconds, collective GiB per chip and step
  (result bytes; each loop body times its trip count)."""
  lines = ['| model | slice | reference | LoRA | pairs | HBM/chip used (GiB) | fits | params+opt '
           '| XLA temp | roofline pairs/s | all-gather | all-reduce | reduce-scatter '
           '| collective-permute | compile s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    c, b = r['per_chip_bytes'], r['collective_bytes_per_chip']
    lines.append(
        f"| {r['model']} | {r['slice']} ({r['num_chips']} chips) | {r['reference']} "
        f"| {('r' + str(r['lora_rank'])) if r['lora_rank'] else '-'} | {r['batch_size']} "
        f"| {_gib(c['total'])} of {_gib(r['hbm_bytes_per_chip'])} "
        f"| {'yes' if r['fits'] else 'no'} | {_gib(c['params'] + c['optimizer'])} "
        f"| {_gib(c['temp'])} | {r['roofline_pairs_per_s']:.1f} | {_gib(b['all-gather'], 2)} "
        f"| {_gib(b['all-reduce'], 2)} | {_gib(b['reduce-scatter'], 2)} "
        f"| {_gib(b['collective-permute'], 2)} | {r['compile_s']:.0f} |")
  return '\n'.join(lines)


def run_case(case: str, batch_size: int, seq_len: int, remat: str) -> dict:
  model, slice_name, reference, lora_rank = parse_case(case)
  slice_ = tpu_chips.parse(slice_name)
  pairs = max(batch_size, slice_.num_chips)
  config = case_config(model, reference, pairs, seq_len, remat, lora_rank)
  start = time.perf_counter()
  row = plan.compile_plan(config, slice_)
  row.update(model=model, slice=slice_name, lora_rank=lora_rank, seq_len=seq_len, remat=remat,
             compile_s=time.perf_counter() - start, date=time.strftime('%Y-%m-%d'),
             # Linux reports ru_maxrss in KiB: the planner host's peak memory for this compile.
             host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--cases', default='', help='MODEL/SLICE/REFERENCE[/loraR],...')
  p.add_argument('--batch_size', type=int, default=16, help='pairs per step (at least chips)')
  p.add_argument('--seq_len', type=int, default=1024)
  p.add_argument('--remat', default='full')
  p.add_argument('--results_dir', required=True)
  p.add_argument('--markdown', action='store_true', help='print the table of RESULTS_DIR')
  args = p.parse_args()
  results = pathlib.Path(args.results_dir)
  if args.markdown:
    rows = [json.loads(f.read_text()) for f in sorted(results.glob('plan_*.json'))]
    print(markdown(rows))
    return
  results.mkdir(parents=True, exist_ok=True)
  for case in filter(None, args.cases.split(',')):
    out = result_path(results, *parse_case(case))
    if out.exists():
      print(f'{case}: {out} exists, skipped', flush=True)
      continue
    row = run_case(case, args.batch_size, args.seq_len, args.remat)
    tmp = out.with_suffix('.tmp')
    tmp.write_text(json.dumps(row, indent=1) + '\n')
    tmp.rename(out)
    print(markdown([row]).splitlines()[-1], flush=True)


if __name__ == '__main__':
  main()
