"""The lab's results for the notebooks: WORKDIR/results.json, running the lab first when absent.

  lab_dir, results = results.find_or_run(lab_dir, smoke=FAST,
                                         explicit='ISDAA_LAB_DIR' in os.environ, cwd=ROOT)
"""

import json
import pathlib
import subprocess
import sys
import tempfile

# The lab's quick mode, as the README's first command runs it.
QUICK_COMMAND = ('-m', 'isdaa_jax.lab', '--config=configs/lab.py:quick')
# tests/lab_test.py's smoke grid: a run of seconds for notebook tests.
SMOKE_OVERRIDES = ("--config.lab.methods=('dpo',)", '--config.lab.seeds=(0,1)',
                   '--config.lab.sft.num_demos=256', '--config.lab.sft.steps=20',
                   '--config.lab.num_pairs=64', '--config.lab.eval_prompts=16',
                   '--config.data.batch_size=16')


def find_or_run(lab_dir: pathlib.Path, *, smoke: bool, explicit: bool,
                cwd: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """(the folder the results are in, the parsed results.json).

  Without results in `lab_dir`, runs the quick lab there (`smoke`: the smoke grid, in a fresh
  temporary folder unless the folder was `explicit`ly chosen, so a smoke run never poses as the
  quick lab). A folder holding an unfinished run is never overwritten.
  """
  if not (lab_dir / 'results.json').is_file():
    if smoke and not explicit:
      lab_dir = pathlib.Path(tempfile.mkdtemp(prefix='isdaa-lab-smoke-'))
    if lab_dir.is_dir() and any(lab_dir.iterdir()):
      raise FileExistsError(f'{lab_dir} holds an unfinished lab run (no results.json); delete it '
                            'or set ISDAA_LAB_DIR to another folder')
    command = [sys.executable, *QUICK_COMMAND, *(SMOKE_OVERRIDES if smoke else ()),
               f'--workdir={lab_dir}']
    print(' '.join(command[1:]))
    # A separate process: the lab's report switches pyplot to Agg, which would end inline plots.
    lab = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if lab.returncode:
      raise RuntimeError(f'the lab failed (exit {lab.returncode}):\n{lab.stderr[-3000:]}')
  return lab_dir, json.loads((lab_dir / 'results.json').read_text())
