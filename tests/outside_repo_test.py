"""The package works from outside the checkout: its defaults live in the package, nothing needs
the repository root on sys.path, and a user's own experiment file elsewhere imports them."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize('module', ['isdaa_jax.score', 'isdaa_jax.evaluate', 'isdaa_jax.main',
                                    'isdaa_jax.data', 'isdaa_jax.lab'])
def test_cli_help_outside_the_checkout(tmp_path, module):
  res = _run(['-m', module, '--help'], tmp_path)
  # absl's --help exits 1 after printing the flags; an import failure would print a traceback.
  assert 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert f'{module.replace(".", "/")}' in res.stdout and '--config' in res.stdout


def test_main_with_an_experiment_file_outside_the_repository(tmp_path):
  experiment = tmp_path / 'my_experiment.py'
  experiment.write_text(textwrap.dedent('''\
      from isdaa_jax import defaults


      def get_config():
        config = defaults.get_config()
        m = config.model
        m.vocab_size, m.hidden_size, m.intermediate_size = 64, 16, 32
        m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 1, 2, 1, 8
        config.data.max_length, config.data.max_prompt_length = 32, 16
        config.data.length_buckets = (32,)
        config.data.synthetic.num_pairs = 16
        config.train.num_steps, config.train.eval_every = 2, 0
        config.train.progress_bar, config.train.tensorboard = False, False
        config.checkpoint.export_hf = False
        return config
      '''))
  assert not experiment.resolve().is_relative_to(REPO)
  res = _run(['-m', 'isdaa_jax.main', f'--config={experiment}', f'--workdir={tmp_path / "run"}',
              '--config.loss.beta=0.2'], tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().split('\n')
          if line]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['loss']['beta'] == 0.2
