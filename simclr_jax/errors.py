"""User errors: input the person running a job got wrong, told in one line instead of a crash.

`simclr_jax.main` prints a `UserError` as `error: <message>` and exits with `EXIT_CODE` (2, as
for a bad command line); any other exception is a bug and keeps its traceback. The types
subclass the built-in ones they replace, so `except ValueError` / `except FileNotFoundError`
still catch them.
"""

EXIT_CODE = 2


class UserError(Exception):
  """Bad input (a config value, dataset, split, path, export); the message says what is allowed."""


class InvalidInput(UserError, ValueError):
  """A value that cannot run: names it, its value and what is allowed."""


class MissingInput(UserError, FileNotFoundError):
  """A file or directory the input names does not exist (a data_dir, an export, a workdir)."""
