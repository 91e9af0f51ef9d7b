"""The over-optimization lab: DAAs with and without importance weighting on a known gold reward.

Run (full study, 365 runs in 3 vectorized programs; 7 min 20 s wall on the idle 2-core machine,
2026-12-07):
  python -m isdaa_jax.lab --config=configs/lab.py --workdir=runs/lab
Quick mode (30 runs; 57 s wall, 74 s user CPU on the idle 2-core machine, 2026-12-07; the
README's first command):
  python -m isdaa_jax.lab --config=configs/lab.py:quick --workdir=runs/lab-quick

Produces in the workdir: `reference/` (the SFT reference policy, Hugging Face format),
`pairs.jsonl` (the Bradley-Terry-labelled preference data),
`results.json` (every gold-reward / KL point), `report.md` (per-method tables with fitted
R(d) = d (a - b log d)) and PNG plots. See `isdaa_jax/lab/task.py` for the task.

The lab's keys and their defaults are in `isdaa_jax/lab/defaults.py`.
"""

from isdaa_jax.lab import defaults


def get_config(mode: str = 'full'):
  return defaults.get_config(mode)
