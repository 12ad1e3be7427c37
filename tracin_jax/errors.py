"""The one base class of the errors a user can fix: a bad setting, file, case or run.

Each module raises its own subclass (`SettingsError`, `BratsDataError`, `StageError`,
`CheckpointError`, `TrainingError`, ...), whose message names the culprit (the flag, file,
case, epoch or argument) and what was wrong, in one sentence. The command line
(`tracin_jax/cli/run.py`) catches `UserError` once and prints `error: <message>`; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input or a workdir in the way; the message says what and where, in one line."""


USER_ERRORS = (UserError,)
