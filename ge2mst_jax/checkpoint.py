"""The one module that talks to orbax.

A checkpoint is a composite of the train state (as a pure dict of arrays) and the grain
data iterator. Saves are asynchronous and atomic (orbax writes to a temporary directory
and renames on completion), so a killed run never leaves a half-written step that looks
complete. Restores go into `ShapeDtypeStruct`s that carry the *current* mesh's shardings,
so a checkpoint written on one device count loads on another. A damaged checkpoint is
reported with its path and the previous complete one is used instead.
"""
from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was asked for."""


def to_pure(state) -> dict:
  return nnx.to_pure_dict(state)


def abstract_pure(abstract_state, shardings) -> dict:
  """ShapeDtypeStructs with the target shardings, laid out like `to_pure(state)`."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
  return nnx.to_pure_dict(target)


class Checkpoints:
  """`CheckpointManager` over `directory` (last `keep` steps) plus `directory/best` (the best eval)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, best_metric: str | None = None):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data"))
    self.best_metric = best_metric
    self.best = None
    if best_metric:
      best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m[best_metric],
                                               best_mode="max", enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
      self.best = ocp.CheckpointManager(os.path.join(self.directory, "best"), options=best_opts,
                                        item_names=("state",))

  # -- saving ------------------------------------------------------------------
  def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(to_pure(state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state, metrics: dict) -> None:
    if self.best is not None and step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(to_pure(state))),
                     metrics={k: float(v) for k, v in metrics.items()}, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    if self.best is not None:
      self.best.close()

  # -- restoring ---------------------------------------------------------------
  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore(self, target_pure: dict, data_iter=None, step: int | None = None, quarantine: bool = False):
    """Restores the newest complete, undamaged step (or `step`); returns `(step, pure_state)`.

    Falls back step by step past damaged checkpoints, logging each one with its path.
    With `quarantine` (resuming training) a damaged step is moved, whole, to
    `damaged_checkpoints/` beside this directory: training will write that step again,
    and nothing is deleted. Returns `(None, None)` when the directory holds no checkpoint.
    """
    candidates = [step] if step is not None else self.steps()[::-1]
    errors = []
    for s in candidates:
      args = {"state": ocp.args.StandardRestore(target_pure)}
      if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**args))
        _check_shapes(restored["state"], target_pure, self.step_path(s))
        return s, restored["state"]
      except Exception as e:  # orbax/tensorstore raise many types for truncated or corrupt files
        msg = f"checkpoint {self.step_path(s)} is damaged or incompatible ({type(e).__name__}: {str(e)[:200]})"
        if quarantine:
          msg += f"; moved to {self._quarantine(s)}"
        logging.warning("%s; trying the previous one.", msg)
        errors.append(msg)
    if errors:
      raise CheckpointError("No usable checkpoint: " + "; ".join(errors))
    return None, None

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _quarantine(self, step: int) -> str:
    dest_dir = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, str(step))
    n = 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
    os.rename(self.step_path(step), dest)
    self.manager.reload()
    return dest


def _check_shapes(restored, target, path) -> None:
  got = jax.tree_util.tree_leaves_with_path(restored)
  want = jax.tree_util.tree_leaves(target)
  bad = [jax.tree_util.keystr(p) for (p, a), b in zip(got, want) if a.shape != b.shape]
  if len(got) != len(want) or bad:
    raise CheckpointError(f"{path}: does not fit the model ({len(got)} vs {len(want)} arrays; shapes differ "
                          f"for {bad[:3]})")


def restore_state_only(directory: str, target_pure: dict, step: int | None = None, fallback: bool = True):
  """Restores just the train state from a checkpoint directory (eval, export, fine-tuning).

  `fallback=False` restores exactly the newest (or `step`) checkpoint and fails on damage
  instead of quietly using an older one.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint directory at {directory}: pass a work directory written by train.py.")
  ckpt = Checkpoints(directory, async_save=False)
  try:
    if step is None and not fallback:
      step = (ckpt.steps() or [None])[-1]
      if step is None:
        raise CheckpointError(f"No checkpoint in {directory}: train first, or point to the right work directory.")
    step, state = ckpt.restore(target_pure, None, step)
  finally:
    ckpt.close()
  if step is None:
    raise CheckpointError(f"No checkpoint in {directory}: train first, or point to the right work directory.")
  return step, state


def restore_as_saved(path: str):
  """`(step, pure_state)` of the newest checkpoint under `path` (a work directory or its
  checkpoints directory), read with the shapes it was saved with: for loading into a model
  whose shapes differ (fine-tuning with a new head)."""
  for d in (path.rstrip("/"), os.path.join(path.rstrip("/"), "checkpoints")):
    if not os.path.isdir(d):
      continue
    mngr = ocp.CheckpointManager(d, item_names=("state", "data"), options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      step = mngr.latest_step()
      if step is not None:
        return step, mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
      mngr.close()
  raise CheckpointError(f"{path!r} holds no checkpoint written by train.py.")
