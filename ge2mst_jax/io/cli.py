"""Command-line plumbing shared by train.py and eval.py: every bad command line, config file
or config override ends in one line that names the problem and the fix, never a traceback."""
from __future__ import annotations

import os
import sys

from absl import flags


def one_line(err: Exception) -> str:
  """The message on one line; of an embedded traceback only its final line (the error itself)."""
  msg = str(err).replace("\\n", "\n")
  if "Traceback (most recent call last)" in msg:
    head, _, tail = msg.partition("Traceback (most recent call last)")
    msg = head + [l for l in tail.splitlines() if l.strip()][-1].strip()
  return " ".join(msg.split())


def _unknown_key_exit(err: Exception, prog: str) -> None:
  """One line for `--config.KEY=...` overrides naming keys the config does not have."""
  lines = str(err).replace("\\n", "\n").strip("\"'").splitlines()
  name = lines[0].strip("\"'\\")
  hint = " " + lines[1].strip("\"'") if len(lines) > 1 else ""
  bad = next((a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.") and name in a), name)
  sys.exit(f"{prog}: unknown config key {bad.lstrip('-')!r}.{hint} See the config file "
           f"for the valid keys (python -c \"from configs import digits; print(digits.get_config())\").")


def guard(fn, *args):
  """Calls `fn(*args)` (flag definition, parsing or reading the config); bad input exits with one line."""
  prog = os.path.basename(sys.argv[0])
  try:
    return fn(*args)
  except (AttributeError, KeyError) as e:
    _unknown_key_exit(e, prog)
  except flags.Error as e:
    sys.exit(f"{prog}: {one_line(e)}")
  except (ValueError, TypeError) as e:  # raised by a config file's get_config (e.g. an unknown model)
    sys.exit(f"{prog}: bad config: {one_line(e)}")
  except OSError as e:  # config_flags defers a config file's load error to the first access
    last = [l for l in str(e).splitlines() if l.strip()][-1].strip()
    sys.exit(f"{prog}: cannot load the config file: {last}")


def load_config(name: str = "config"):
  """The parsed config flag `name` (or None); a file that failed to load exits with one line."""
  def load():
    cfg = getattr(flags.FLAGS, name)
    if cfg is not None:
      cfg.keys()  # touches the config: raises the deferred load error, if any
    return cfg
  return guard(load)


def parse_flags(argv):
  """`flags_parser` for `app.run`."""
  return guard(flags.FLAGS, argv)
