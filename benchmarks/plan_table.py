"""The README's TPU planning table: `isdaa_jax.plan` for Llama presets on a few slices.

  python benchmarks/plan_table.py --out=runs/plan_table.jsonl \
      --models=llama3.2-1b,llama3.2-3b --topologies=v5p-8,v6e-8 --references=model,cached

One JSON line per (model, topology, reference) is appended to --out as soon as it compiles (a
Llama-3.2-1B compile takes minutes on a 2-core host), then a markdown table is printed. The
config: bfloat16 compute, float32 parameters, remat 'full', scan_layers, fsdp over every chip,
--batch_size pairs of --seq_len tokens (half prompt), padded layout, DPO with importance weights.
"""

import argparse
import json
import time

from isdaa_jax import defaults, plan, tpu_chips


def case_config(model: str, reference: str, batch_size: int, seq_len: int, remat: str):
  config = defaults.get_config()
  m = config.model
  m.preset, m.param_dtype, m.dtype, m.remat, m.scan_layers = model, 'float32', 'bfloat16', remat, True
  d = config.data
  d.max_length, d.max_prompt_length, d.length_buckets = seq_len, seq_len // 2, (seq_len,)
  d.batch_size = batch_size
  config.loss.importance.enabled = True
  config.train.reference = reference
  return config


def markdown(rows) -> str:
  lines = ['| model | slice | reference | mesh | HBM/chip used | fits | XLA temp | roofline pairs/s '
           '| compile s |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    gib = lambda x: f'{x / tpu_chips.GiB:.1f} GiB'  # noqa: E731
    c = r['per_chip_bytes']
    lines.append(f"| {r['model']} | {r['slice']} ({r['num_chips']} chips) | {r['reference']} | "
                 f"fsdp={r['mesh']['fsdp']} | {gib(c['total'])} of {gib(r['hbm_bytes_per_chip'])} "
                 f"| {'yes' if r['fits'] else 'no'} | {gib(c['temp'])} | "
                 f"{r['roofline_pairs_per_s']:.1f} | {r['compile_s']:.0f} |")
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default='llama3.2-1b,llama3.2-3b')
  p.add_argument('--topologies', default='v5p-8,v6e-8')
  p.add_argument('--references', default='model,cached')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=1024)
  p.add_argument('--remat', default='full')
  p.add_argument('--out', required=True)
  args = p.parse_args()
  rows = []
  for model in args.models.split(','):
    for topology in args.topologies.split(','):
      for reference in args.references.split(','):
        config = case_config(model, reference, args.batch_size, args.seq_len, args.remat)
        start = time.perf_counter()
        row = plan.compile_plan(config, tpu_chips.parse(topology))
        row.update(model=model, slice=topology, compile_s=time.perf_counter() - start,
                   date=time.strftime('%Y-%m-%d'))
        rows.append(row)
        with open(args.out, 'a') as f:
          f.write(json.dumps(row) + '\n')
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
  print(markdown(rows))


if __name__ == '__main__':
  main()
