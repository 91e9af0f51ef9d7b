"""Trains a policy: `python -m isdaa_jax.main --config=configs/hh.py --workdir=DIR`.

Any config key can be overridden: `--config.loss.name=ipo --config.train.num_steps=200`.
The resolved config is written to DIR/config.json once the run is accepted (an earlier, different
one is kept as DIR/config.<time>.json); rerunning on the same DIR resumes.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from isdaa_jax import cli, config as config_lib
from isdaa_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and exports go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import jax  # pylint: disable=g-import-not-at-top
  from isdaa_jax import checkpoint, distributed, preemption, train, workdir_lock  # pylint: disable=g-import-not-at-top  (after flags: JAX start-up)

  if not flags.FLAGS['verbosity'].present:
    # Orbax and Grain log every save and worker at INFO; keep the console to warnings.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    config_lib.validate(config)
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserError(f'cannot create the workdir {workdir} ({e.strerror}); pass a --workdir '
                      'you can write to') from None
    checkpoint.check_writable(workdir)
    distributed.initialize(config.distributed)  # for process_index: only process 0 locks
    with workdir_lock.WorkdirLock(workdir, take=jax.process_index() == 0):
      train.run(config, workdir)  # writes config.json once the run is accepted
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print(f'error: interrupted twice, so stopped without saving; the latest complete checkpoint '
          f'in {workdir / "checkpoints"} is intact and rerunning resumes from it',
          file=sys.stderr)
    sys.exit(130)
  if preemption.interrupted():
    print(f'interrupted: checkpoint saved in {workdir / "checkpoints"}; rerun the same command '
          'to resume', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
