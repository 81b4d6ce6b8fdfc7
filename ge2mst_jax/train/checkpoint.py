"""The one module that talks to orbax.

A checkpoint step is a directory of three items, each in orbax's standard formats (so
`orbax.checkpoint` and numpy read it without this package):

  state/          the train state as a pure dict of arrays under readable names:
                  `model/...` (parameters, BatchNorm statistics, thresholds, by their nnx paths,
                  e.g. `model/stages/1/1/attn/k/kernel`) and `optimizer/...` (`step`, and
                  `opt_state/...`: the optax chain's state as optax lays it out).
  format/         a small JSON: `{"version": 2, "state": ["model", "optimizer"]}`.
  data_position/  a small JSON: how many records each process has read, with the process count,
                  so that a run restored on another number of hosts continues at the same place
                  (see `data.pipeline.resume_records`).

`best/` holds the best evaluated step's `state` and `format` alike. Format 1 (steps without a
`format` item) stored the state positionally, `state/0` the model and `state/1` the optimizer, and
an attention block's input neuron inside its attention layer (`attn/q/neuron`, `attn/q/conv`). Such
steps are read as they are and renamed on reading; nothing on disk is moved or rewritten, and a
resumed run writes its new steps in the current format.

Saves are asynchronous and atomic (orbax commits a step only when it is complete), so a
killed run never leaves a half-written step that looks complete. Restores go into
`ShapeDtypeStruct`s that carry the *current* mesh's shardings, so a checkpoint written on one
device or host count loads on another.

Restoring is one decision for all hosts: process 0 lists the steps and checks each
candidate's saved shapes against the model (checkpoint metadata, before any read); every host
then restores the same step, and a step that any host could not read is moved aside by
process 0 (never deleted) and the previous one tried. A checkpoint that is readable but
written for another model is not damage: it is a one-line error naming the differing shapes
and config keys, and nothing is moved.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, traverse_util

from ge2mst_jax.io import paths
from ge2mst_jax.io import saved_config
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.io.errors import CheckpointError, CheckpointWriteError, IncompatibleCheckpointError
from ge2mst_jax.nn.models import legacy_path

ITEMS = ("state", "format", "data_position")
FORMAT_VERSION = 2
FORMAT = {"version": FORMAT_VERSION, "state": ["model", "optimizer"]}
V1_NAMES = ("model", "optimizer")   # what format 1 stored as state/0 and state/1


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's array handling with one change: a replicated array is saved from one replica.

  orbax's default on CPU and TPU splits every replicated array among its replicas and slices it
  on the devices before the host transfer, one eager `slice` program per array shape and
  replica: a first save compiles hundreds of them even for a small network on 8 devices, and
  stalls for as long on a host as on a pod. The state of these models is ~0.1-0.2 GB, so one
  replica writing each array costs nothing worth that. The files
  are orbax's usual ones (`restore_as_saved` reads them with StandardRestore).
  """
  array = ocp.type_handlers.get_type_handler(jax.Array)
  registry = ocp.type_handlers.create_type_handler_registry(
      *((t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)),
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                 array_metadata_store=getattr(array, "_array_metadata_store", None))))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _handlers(*items) -> dict:
  return {k: _state_handler() if k == "state" else ocp.JsonCheckpointHandler() for k in items}


# ----------------------------------------------------------------------------
# State trees
# ----------------------------------------------------------------------------
def to_pure(state) -> dict:
  return nnx.to_pure_dict(state)


def abstract_pure(abstract_state, shardings) -> dict:
  """ShapeDtypeStructs with the target shardings, laid out like `to_pure(state)`."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
  return nnx.to_pure_dict(target)


def _v1_path(path: tuple) -> tuple:
  """Where a leaf of a format-1 state lives now: `0/...` is `model/...` and `1/...` is
  `optimizer/...`, and inside them the attention blocks' paths as they were before each block
  owned its input neuron (`models.legacy_path`)."""
  return (V1_NAMES[int(path[0])],) + legacy_path(tuple(path[1:]))


def named(saved: dict, version: int) -> dict:
  """A state tree read from a step of format `version`, under the current names."""
  if version != 1 or saved is None:
    return saved
  flat = traverse_util.flatten_dict(saved)
  return nnx.restore_int_paths(traverse_util.unflatten_dict({_v1_path(k): v for k, v in flat.items()}))


def as_saved(target: dict, version: int, saved: dict) -> dict:
  """`target` (under the current names) laid out as the step of format `version` whose saved
  tree (metadata will do) is `saved`: the restore target for that step."""
  if version != 1:
    return target
  where = {tuple(map(str, _v1_path(k))): k for k in traverse_util.flatten_dict(saved)}
  flat = traverse_util.flatten_dict(target)
  return traverse_util.unflatten_dict({where.get(tuple(map(str, k)), k): v for k, v in flat.items()})


def saved_version(step_dir) -> int:
  """The format version of a saved step: its `format` item's, or 1 for a step without one."""
  step_dir = epath.Path(step_dir)
  if not (step_dir / "format").exists():
    return 1
  return int(ocp.JsonCheckpointHandler().restore(step_dir / "format")["version"])


def _newer_format(step_dir, version: int) -> str:
  return (f"Checkpoint {step_dir} has format version {version}, newer than this ge2mst_jax reads "
          f"(1 to {FORMAT_VERSION}): read it with the ge2mst_jax that wrote it, or a newer one.")


def shape_mismatches(saved: dict, target: dict) -> list[str]:
  """Arrays whose presence or shape differs between a saved tree and the model's."""
  s, t = ({k: tuple(x.shape) for k, x in saved_config.flat(tree).items()} for tree in (saved, target))
  return [f"{k}: {s.get(k, 'absent')} saved, {t.get(k, 'absent')} now" for k in sorted(set(s) | set(t))
          if s.get(k) != t.get(k)]


def _root_cause(e: BaseException) -> BaseException:
  """The first OSError with an errno in `e`'s chain of causes, else the innermost cause."""
  seen = []
  while e is not None and e not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen[-1]


# ----------------------------------------------------------------------------
# The checkpoint directory
# ----------------------------------------------------------------------------
class Checkpoints:
  """`CheckpointManager` over `directory` (last `keep` steps) plus `directory/best` (the best eval)."""

  def __init__(self, directory, keep: int = 3, async_save: bool = True, best_metric: str | None = None,
               read_only: bool = False):
    self.directory = paths.resolve(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers=_handlers(*ITEMS))
    self.best_metric = best_metric
    self.best = None
    self._failed = False
    if best_metric:
      best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m[best_metric],
                                               best_mode="max", enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
      self.best = ocp.CheckpointManager(self.directory / "best", options=best_opts,
                                        item_handlers=_handlers("state", "format"))

  # -- saving ------------------------------------------------------------------
  # A save that fails (a full disk, a bucket that went away) fails in orbax's background thread
  # and surfaces at the next save or wait, as whatever its storage layer raised. `_writing` makes
  # it one `CheckpointWriteError` naming the cause, the last complete checkpoint and the fix, and
  # removes what the failed save left behind; complete steps are never touched.
  def save(self, step: int, state, data_position: dict | None = None, force: bool = False) -> bool:
    args = {"state": ocp.args.PyTreeSave(to_pure(state)), "format": ocp.args.JsonSave(FORMAT)}
    if data_position is not None:
      args["data_position"] = ocp.args.JsonSave(data_position)
    with self._writing():
      return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state, metrics: dict) -> None:
    with self._writing():
      if self.best is not None and step not in self.best.all_steps():
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(to_pure(state)),
                                                     format=ocp.args.JsonSave(FORMAT)),
                       metrics={k: float(v) for k, v in metrics.items()}, force=True)

  def wait(self) -> None:
    with self._writing():
      self.manager.wait_until_finished()
      if self.best is not None:
        self.best.wait_until_finished()

  @contextlib.contextmanager
  def _writing(self):
    try:
      yield
    except Exception as e:  # orbax, tensorstore, gcsfs and the OS raise many types
      if self._failed:
        raise
      self._failed = True
      self._discard_unfinished()
      raise CheckpointWriteError(self._write_failure(e)) from None

  def _discard_unfinished(self) -> None:
    """Removes the temporary directories of saves that did not finish, once their threads have
    stopped (process 0 removes, as it lists for everyone). A step is complete only once orbax
    renamed it from its temporary name (or, in a bucket, wrote its commit marker), so nothing
    removed here was complete."""
    for manager in (self.manager, self.best):
      with contextlib.suppress(Exception):
        if manager is not None:
          manager.wait_until_finished()
    if jax.process_index() != 0:
      return
    for d in (self.directory, self.directory / "best"):
      with contextlib.suppress(Exception):   # an unreachable bucket: nothing can be removed now
        for p in d.glob("*.orbax-checkpoint-tmp*"):
          p.rmtree() if p.is_dir() else p.unlink()

  def _write_failure(self, e: BaseException) -> str:
    cause = _root_cause(e)
    if isinstance(cause, OSError) and cause.errno is not None:
      full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
      what = f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
    else:
      what = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
      full = "No space left on device" in what or "Disk quota exceeded" in what
    try:
      steps = self.steps()
      last = (f"the last complete checkpoint is {self.step_path(steps[-1])} (step {steps[-1]})" if steps
              else "no checkpoint is complete yet")
    except Exception:  # the storage cannot even be listed
      last = "its steps cannot be listed now (those complete before stay as they are)"
    fix = ("free space there or pass another --workdir (copy the checkpoints over to keep them)" if full else
           "check that it can be written (a bucket or network share that went away: wait until it is back)")
    return (f"Could not write a checkpoint to {self.directory} ({what}); {last}: {fix}, then run the "
            f"same command to resume from it.")

  def close(self) -> None:
    # After a failed save orbax raises its error again at every wait; it was reported once.
    with contextlib.suppress(Exception) if self._failed else self._writing():
      self.manager.close()
      if self.best is not None:
        self.best.close()
    if self._failed:  # a failed save's writers may still have been running when it was reported
      self._discard_unfinished()

  # -- restoring ---------------------------------------------------------------
  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def saved_shapes(self, step: int) -> dict:
    """The state's array metadata as saved (shapes, in the saved layout), read without reading any array."""
    return ocp.StandardCheckpointer().metadata(self.step_path(step) / "state").item_metadata.tree

  def _verdict(self, step: int, target_pure: dict) -> tuple[str, int, str]:
    """('ok' | 'damaged' | 'incompatible' | 'newer', format version, detail) from the saved
    metadata (process 0)."""
    try:
      version = saved_version(self.step_path(step))
      saved = named(self.saved_shapes(step), version) if version <= FORMAT_VERSION else None
    except Exception as e:  # missing or unreadable metadata: the step is damaged
      return "damaged", 0, f"{type(e).__name__}: {str(e)[:200]}"
    if saved is None:
      return "newer", version, ""
    bad = shape_mismatches(saved, target_pure)
    return ("incompatible", version, "; ".join(bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")) \
        if bad else ("ok", version, "")

  def restore(self, target_pure: dict, step: int | None = None, quarantine: bool = False,
              saved_cfg=None, config=None):
    """Restores the newest complete, undamaged step (or `step`); returns `(step, pure_state, data_position)`.

    Falls back step by step past damaged checkpoints, logging each with its path. With
    `quarantine` (resuming training) process 0 moves a damaged step, whole, to
    `damaged_checkpoints/` beside this directory: training will write that step again, and
    nothing is deleted. An incompatible step raises `IncompatibleCheckpointError` (with the
    config keys that differ between `saved_cfg` and `config`, when given); nothing moves.
    A step of an older format is read into `target_pure`'s names (`named`); one of a newer
    format raises `CheckpointError`. Returns `(None, None, None)` when the directory holds no
    checkpoint.
    """
    candidates = shd.from_process_0([step] if step is not None else self.steps()[::-1])
    codes = {"ok": 0, "damaged": 1, "incompatible": 2, "newer": 3}
    errors = []
    for s in candidates:
      verdict, version, detail = self._verdict(s, target_pure) if jax.process_index() == 0 else ("ok", 0, "")
      code, version = shd.from_process_0([codes[verdict], version])
      verdict = list(codes)[code]
      if verdict == "incompatible":
        raise IncompatibleCheckpointError(self._incompatible_message(s, detail, saved_cfg, config))
      if verdict == "newer":
        raise CheckpointError(_newer_format(self.step_path(s), version))
      restored, problem = None, detail
      if verdict == "ok":
        try:
          target = as_saved(target_pure, version, self.saved_shapes(s) if version == 1 else None)
          args = {"state": ocp.args.PyTreeRestore(target,
                                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
          if (self.step_path(s) / "data_position").exists():
            args["data_position"] = ocp.args.JsonRestore()
          restored = self.manager.restore(s, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax/tensorstore raise many types for truncated or corrupt files
          problem = f"{type(e).__name__}: {str(e)[:200]}"
      if shd.all_hosts(restored is not None):
        if version < FORMAT_VERSION:
          logging.info("Read %s (format %d) into the names of format %d.", self.step_path(s), version, FORMAT_VERSION)
        return s, named(restored["state"], version), restored.get("data_position")
      msg = f"checkpoint {self.step_path(s)} is damaged ({problem or 'unreadable on another host'})"
      if quarantine and jax.process_index() == 0:
        msg += f"; moved to {self._quarantine(s)}"
      logging.warning("%s; trying the previous one.", msg)
      errors.append(msg)
      shd.all_hosts(True)  # the move is complete before any host lists the steps again
    if errors:
      raise CheckpointError("No usable checkpoint: " + "; ".join(errors))
    return None, None, None

  def _incompatible_message(self, step, detail, saved_cfg, config) -> str:
    keys = saved_config.diff(saved_cfg, config) if saved_cfg is not None and config is not None else []
    because = f" The config differs in {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}." if keys else ""
    return (f"Checkpoint {self.step_path(step)} was written for a different model ({detail}).{because} "
            f"Resume with the config it was written with, or pass another --workdir for a new run; "
            f"nothing was moved or overwritten.")

  def _quarantine(self, step: int) -> epath.Path:
    dest_dir = self.directory.parent / "damaged_checkpoints"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, n = dest_dir / str(step), 1
    while dest.exists():
      dest, n = dest_dir / f"{step}.{n}", n + 1
    paths.move_tree(self.step_path(step), dest)
    self.manager.reload()
    return dest


def restore_state_only(directory, target_pure: dict, step: int | None = None, fallback: bool = True):
  """Restores just the train state from a checkpoint directory (eval, export, fine-tuning).

  `fallback=False` restores exactly the newest (or `step`) checkpoint and fails on damage
  instead of quietly using an older one.
  """
  if not epath.Path(directory).is_dir():
    raise CheckpointError(f"No checkpoint directory at {directory}: pass a work directory written by train.py.")
  ckpt = Checkpoints(directory, async_save=False, read_only=True)
  try:
    if step is None and not fallback:
      step = (ckpt.steps() or [None])[-1]
      if step is None:
        raise CheckpointError(f"No checkpoint in {directory}: train first, or point to the right work directory.")
    step, state, _ = ckpt.restore(target_pure, step)
  finally:
    ckpt.close()
  if step is None:
    raise CheckpointError(f"No checkpoint in {directory}: train first, or point to the right work directory.")
  return step, state


def restore_as_saved(path):
  """`(step, pure_state)` of the newest checkpoint under `path` (a work directory or its
  checkpoints directory), read with the shapes it was saved with, under the current names
  (`{"model": ..., "optimizer": ...}`, whichever format it was written in): for loading into
  a model whose shapes differ (fine-tuning with a new head)."""
  path = epath.Path(path)
  for d in (path, path / "checkpoints"):
    if not d.is_dir():
      continue
    mngr = ocp.CheckpointManager(d, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      step = mngr.latest_step()
      if step is not None:
        version = saved_version(d / str(step))
        if version > FORMAT_VERSION:
          raise CheckpointError(_newer_format(d / str(step), version))
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return step, named(state, version)
    finally:
      mngr.close()
  raise CheckpointError(f"{path!r} holds no checkpoint written by train.py.")
