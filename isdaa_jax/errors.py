"""The one error type for what a user can cause and fix.

Every failure a user brings about (a config value, a missing or malformed file, a bad row, an
unreachable hub, a mesh that does not fit the devices, a stale cache, a diverged run) raises a
`UserError` subclass whose message is one sentence saying what to do. The entry points print
exactly that sentence and exit 1; any other exception is a bug and keeps its traceback.

It derives from ValueError so that callers who caught ValueError before keep working.
"""


class UserError(ValueError):
  """A problem the user can fix; the message says how."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist."""


class ModelFileError(UserError):
  """A checkpoint or model file that does not describe a supported Llama model."""
