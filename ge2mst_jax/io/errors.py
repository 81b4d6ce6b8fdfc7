"""What can go wrong for a user, as exception types (a leaf module: everyone may raise these).

Each message names the problem and the fix on one line; `train.py` and `eval.py` print it
instead of a traceback.
"""


class CheckpointError(RuntimeError):
  """No usable checkpoint (or saved config, or export) where one was asked for."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (a full disk, an unreachable bucket); the complete ones are kept."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint written for another model (shapes differ)."""


class DataError(ValueError):
  """A data set that cannot be read, with what to do about it."""


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


class Preempted(Exception):
  """A stop was requested (SIGTERM/SIGINT, or a preemption notice on any host); the step was saved."""


class LeaseHeldError(RuntimeError):
  """Another live run holds the work directory."""
