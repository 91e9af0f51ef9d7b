"""Entry points end a bad --config file or override key in one sentence, exit status 1."""

import os
import pathlib
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).parents[1]


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_sentence(res, sentence):
  assert res.returncode == 1, res.stderr[-2000:]
  assert 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1] == f'error: {sentence}', res.stderr[-2000:]


@pytest.mark.parametrize('override, sentence', [
    ('--config.loss.bta=0.1', 'unknown config key loss.bta; did you mean loss.beta?'),
    ('--config.lss.beta=0.1', 'unknown config key lss.beta; did you mean loss.beta?'),
])
def test_unknown_override_key(tmp_path, override, sentence):
  res = _run('isdaa_jax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}', override)
  _assert_one_sentence(res, sentence)
  assert not (tmp_path / 'config.json').exists()


def test_unknown_override_key_in_lab():
  res = _run('isdaa_jax.lab', '--config=configs/lab.py', '--config.lab.nosuchkey=1')
  assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert 'error: unknown config key lab.nosuchkey' in res.stderr


def test_missing_config_file(tmp_path):
  missing = tmp_path / 'nope.py'
  res = _run('isdaa_jax.main', f'--config={missing}', f'--workdir={tmp_path / "w"}')
  _assert_one_sentence(res, f'the config file {missing} could not be loaded; check that the '
                       'path exists')


def test_config_file_with_syntax_error(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n')
  res = _run('isdaa_jax.main', f'--config={bad}', f'--workdir={tmp_path / "w"}')
  _assert_one_sentence(res, f'the config file {bad} does not compile (invalid syntax, line 1); '
                       'fix it and rerun')
