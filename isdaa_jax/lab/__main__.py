"""`python -m isdaa_jax.lab --config=configs/lab.py[:quick] --workdir=DIR`: the whole study."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from isdaa_jax import cli, config as config_lib
from isdaa_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Lab config (configs/lab.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from isdaa_jax.lab import study  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax/Grain log every save at INFO
  config = _CONFIG.value
  try:
    config_lib.validate(config)
    results = study.run_study(config, _WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  logging.info('lab finished in %.0f s', results['meta']['seconds'])
  print(results['verdict'])
  print(f'report: {_WORKDIR.value}/report.md')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
