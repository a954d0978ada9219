"""The one exception type for mistakes a user can make (bad config, bad files).

`main.py` turns a `UserError` into a one-line message and exit status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A bad value supplied by the user; the message names it and what is valid."""


def check(condition: bool, message: str) -> None:
  """Raises `UserError(message)` unless `condition` holds."""
  if not condition:
    raise UserError(message)
