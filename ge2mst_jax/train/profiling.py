"""A `jax.profiler` trace of a few training steps, for TensorBoard's profile plugin.

Off by default (`profile.steps = 0`). With `--config.profile.steps=N` the run traces N train
steps, starting `profile.after` steps into the run (past compilation and the first slow steps),
into `WORKDIR/profile/host_<process index>/`: one folder per host, so that the hosts of a pod do
not overwrite each other. The profiler writes to a local directory, which is then copied into
the work directory through epath, so a bucket work directory gets its trace too.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

import jax
from etils import epath


def check(cfg) -> None:
  """One-line errors for a bad `profile` config, before any compile or write."""
  p = cfg.profile
  if p.steps < 0 or p.after < 0:
    raise ValueError(f"profile.steps={p.steps} and profile.after={p.after} must be >= 0 (profile.steps=0: off).")


class StepTrace(contextlib.AbstractContextManager):
  """Call `before(step)` and `after(step, outputs)` around every train step of the loop."""

  def __init__(self, cfg, workdir, first_step: int, log=print):
    p = cfg.profile
    self.first = first_step + p.after if p.steps else None
    self.last = None if self.first is None else self.first + p.steps - 1
    self.dest = epath.Path(workdir) / "profile" / f"host_{jax.process_index()}"
    self.local, self.log = None, log

  def before(self, step: int) -> None:
    if step == self.first:
      self.local = tempfile.mkdtemp(prefix="ge2mst_profile_")
      jax.profiler.start_trace(self.local)

  def after(self, step: int, outputs) -> None:
    if self.local is not None and step == self.last:
      jax.block_until_ready(outputs)   # the trace must hold the steps' device work, not just their dispatch
      self._stop()
      self.log(f"Profile of steps {self.first}-{self.last}: {self.dest} (tensorboard --logdir {self.dest.parent})")

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    local, self.local = self.local, None
    for root, _, files in os.walk(local):
      for name in files:
        target = self.dest / os.path.relpath(os.path.join(root, name), local)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pathlib.Path(root, name).read_bytes())
    shutil.rmtree(local, ignore_errors=True)

  def __exit__(self, *exc):
    if self.local is not None:   # the run ended inside the traced steps: keep what was traced
      self._stop()
    return None
