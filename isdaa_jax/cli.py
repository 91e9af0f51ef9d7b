"""Flag parsing for the entry points: a bad --config file or override key is one sentence.

absl parses flags inside `app.run`, before `main` runs, so a mistyped override
(`--config.loss.bta=0.1`) or a config file that is missing or does not compile would otherwise end
in a long traceback from ml_collections. Pass `flags_parser=cli.parse_flags` to `app.run`.
"""

import re
import sys

from absl import flags


def _unknown_key(error: BaseException, argv) -> str | None:
  """The sentence for an override naming a key the config lacks, or None."""
  missing, e = None, error
  while e is not None:  # ml_collections wraps the KeyError of the bare key name twice
    if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) and '\n' not in e.args[0]:
      missing = e.args[0]
    e = e.__context__
  if missing is None:
    return None
  hint = re.search(r'Did you mean "([^"]+)"', str(error))
  for arg in argv[1:]:
    parts = arg.lstrip('-').split('=', 1)[0].split('.')
    if len(parts) < 2 or missing not in parts[1:]:
      continue
    key = '.'.join(parts[1:])
    if hint:
      guess = [hint.group(1) if p == missing else p for p in parts[1:]]
      return f'unknown config key {key}; did you mean {".".join(guess)}?'
    return f'unknown config key {key}; check the spelling against the config file'
  return None


def _config_file_problem(error: BaseException, argv) -> str | None:
  match = re.search(r'Attempted \[[^]]*\]:\s*(\S+)', str(error))
  files = [a.split('=', 1)[1] for a in argv[1:] if re.match(r'--?config=', a)]
  path = match.group(1) if match else files[0] if files else 'the --config file'
  if isinstance(error, SyntaxError):
    return (f'the config file {path} does not compile ({error.msg}, line {error.lineno}); fix '
            'it and rerun')
  if isinstance(error, OSError) or 'Failed loading config file' in str(error):
    return f'the config file {path} could not be loaded; check that the path exists'
  return None


def parse_flags(argv):
  """absl flag parsing, ending bad config flags with `error: <sentence>` and exit status 1."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:
      value = flags.FLAGS[name].value
      if type(value).__module__.startswith('ml_collections'):
        value.keys()  # a config file that failed to load raises only when first used
    return rest
  except flags.Error as e:
    # A missing required flag, a wrong type: absl's own message is already one line.
    sentence = str(e).strip().splitlines()[0]
  except (AttributeError, KeyError, SyntaxError, OSError, ImportError, ValueError) as e:
    sentence = _unknown_key(e, argv) if isinstance(e, (AttributeError, KeyError)) else None
    sentence = sentence or _config_file_problem(e, argv)
    if sentence is None:
      raise
  print(f'error: {sentence}', file=sys.stderr)
  sys.exit(1)
