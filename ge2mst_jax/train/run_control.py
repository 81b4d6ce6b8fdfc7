"""What keeps a run safe on a pod: a checked work directory and its lease, one preemption
decision for all hosts, and a step-progress watchdog.

- `check_workdir`: a work directory (local or a bucket) that cannot be reached is one line,
  before anything is written; `workdir_lease` holds its lease for the run on process 0.

- `Lease`: process 0 owns the work directory through `lease.json` (an owner id and a
  heartbeat time, refreshed by a thread). A fresh lease of another owner refuses the run; a
  stale one (its holder died, e.g. a preempted node) is taken over, so a job requeued onto
  other machines, or into a container where every run is pid 1, starts without help. It works
  the same on a local disk and on a bucket (no O_EXCL, no pid checks).
- `PreemptionCheck`: on one process, SIGTERM/SIGINT set a flag checked between steps. On
  several, JAX's preemption service (started by `jax.distributed.initialize`, which catches
  SIGTERM itself) tells every host the same step to save at, whichever host got the signal.
- `Watchdog`: a host whose steps stop completing (a dead or frozen peer, a collective that
  never completes) logs the step and host and exits with `EXIT_STALLED`, so the scheduler
  restarts the job from the last checkpoint instead of holding the slice forever. It counts
  completed work (`InFlight`), never dispatch, and does not count compiles and saves.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid

import jax
from etils import epath
from jax.experimental import multihost_utils

from ge2mst_jax.io import paths
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.io.errors import LeaseHeldError

LEASE_FILE = "lease.json"
EXIT_STALLED = 75  # EX_TEMPFAIL: "try again", what a scheduler's retry policy should see


def owner_id() -> str:
  """Who a lease belongs to: the scheduler's job id when there is one (a requeued job takes its
  own lease back at once), otherwise a fresh id per run."""
  job = os.environ.get("GE2MST_JOB_ID") or os.environ.get("SLURM_JOB_ID")
  return f"job-{job}" if job else uuid.uuid4().hex


def _dead_here(held: dict) -> bool:
  """A holder on this machine whose process is gone (killed, crashed), or that had the pid this
  process has now (a container where every run is pid 1): no need to wait for its lease to expire."""
  if held.get("host") != socket.gethostname():
    return False
  pid = int(held.get("pid", 0))
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OSError):
    return False
  return False


class Lease:
  """Exclusive use of a work directory by one run: an owner id plus a heartbeat time."""

  def __init__(self, workdir, timeout_secs: float = 60.0, heartbeat_secs: float = 10.0, owner: str | None = None):
    self.path = epath.Path(workdir) / LEASE_FILE
    self.timeout, self.interval = float(timeout_secs), float(heartbeat_secs)
    self.owner = owner or owner_id()
    self.lost_to: str | None = None
    self._stop = threading.Event()
    self._thread = None

  def read(self) -> dict | None:
    try:
      rec = json.loads(self.path.read_text())
      return rec if isinstance(rec, dict) and "owner" in rec and "heartbeat" in rec else None
    except (FileNotFoundError, ValueError):
      return None

  def _write(self) -> None:
    rec = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    paths.write_text_atomic(self.path, json.dumps(rec))

  def check(self) -> None:
    """Raises `LeaseHeldError` when another owner's heartbeat is fresh (nothing is written)."""
    held = self.read()
    if held is None or held["owner"] == self.owner:
      return
    age = time.time() - float(held["heartbeat"])
    if age < self.timeout and not _dead_here(held):
      raise LeaseHeldError(
          f"Work directory {self.path.parent} is in use by another run (owner {held['owner']}, "
          f"process {held.get('pid')} on {held.get('host')}, heartbeat {age:.0f} s ago): wait for it, pass another "
          f"--workdir, or if that run is gone its lease expires {self.timeout - age:.0f} s from now "
          f"(lease.timeout_secs={self.timeout:g}).")
    logging.warning("Taking over the stale lease of %s (owner %s, no heartbeat for %.0f s).",
                    self.path.parent, held["owner"], age)

  def acquire(self) -> "Lease":
    self.check()
    self._write()
    # Two runs that both found the lease free both wrote it; the last write wins and the
    # other sees it here. (Local disks and object stores give no compare-and-swap via epath.)
    time.sleep(min(0.2, self.interval))
    held = self.read()
    if held is None or held["owner"] != self.owner:
      raise LeaseHeldError(f"Work directory {self.path.parent} was taken by another run (owner "
                           f"{(held or {}).get('owner')}) while this one started: pass another --workdir.")
    self._thread = threading.Thread(target=self._beat, name="ge2mst-lease", daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.interval):
      try:
        held = self.read()
        if held is not None and held["owner"] != self.owner:
          self.lost_to = held["owner"]
          logging.error("Lost the lease of %s to %s.", self.path.parent, self.lost_to)
          return
        self._write()
      except Exception as e:  # a transient storage error: try again at the next beat
        logging.warning("Lease heartbeat failed (%s); retrying.", e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      held = self.read()
      if held is not None and held["owner"] == self.owner:
        self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class PreemptionCheck:
  """`reached(step)` is True on every host at the same step once a stop was requested."""

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.signum = None
    self._old = {}

  def __enter__(self):
    # Multi-host: JAX's preemption notifier owns SIGTERM; a handler of ours would replace it.
    if not self.multihost and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def reached(self, step: int) -> bool:
    if not self.multihost:
      return self.signum is not None
    return multihost_utils.reached_preemption_sync_point(step)

  def describe(self) -> str:
    return f"signal {self.signum}" if self.signum is not None else "a preemption notice"


class Watchdog:
  """Exits the process when no work completes for `timeout_secs` (0: off).

  Work completes when its results are ready, not when it is dispatched: JAX returns from a step
  call at once and lets the host run ahead, so a beat at dispatch followed by a host sync that
  waits for the whole backlog looks like a stall to a watchdog that is only late. The loop
  beats through `InFlight` (a train step whose outputs are ready) and the evaluator after each
  completed batch. A checkpoint save is work of its own kind: `in_phase(...)` beats when it starts
  and when it ends, so it has the whole timeout (a save waits for its peers at barriers that
  have no timeout of their own, so it must stay watched). A compile reports nothing while it
  runs and waits for no peer: it runs inside `held(...)`, where the clock stops, and starts
  afresh when it ends. Armed by the first beat.
  """

  def __init__(self, timeout_secs: float, exit_fn=os._exit):
    self.timeout = float(timeout_secs)
    self.step, self.phase, self.last = 0, "start", None
    self._held = 0
    self._exit = exit_fn
    self._stop = threading.Event()
    self._thread = None

  def beat(self, step: int, phase: str = "train") -> None:
    self.step, self.phase, self.last = step, phase, time.monotonic()

  @contextlib.contextmanager
  def in_phase(self, phase: str, step: int):
    """Work of another kind than steps (a save): a beat when it starts and when it ends."""
    before = self.phase
    self.beat(step, phase)
    try:
      yield
    finally:
      self.beat(step, before)

  @contextlib.contextmanager
  def held(self, phase: str, step: int):
    """Work that is not counted as a stall however long it takes (a compile)."""
    before = self.phase
    self._held += 1
    self.step, self.phase = step, phase
    try:
      yield
    finally:
      self._held -= 1
      self.phase = before
      if self.last is not None:  # the clock starts again where the held work ended
        self.last = time.monotonic()

  def __enter__(self):
    if self.timeout > 0:
      self._thread = threading.Thread(target=self._watch, name="ge2mst-watchdog", daemon=True)
      self._thread.start()
    return self

  def _watch(self) -> None:
    # Sleeps until the exact deadline, so that a stall is reported at `timeout` after the last
    # completed work, not up to a polling interval later.
    while True:
      last = self.last
      wait = self.timeout if last is None or self._held else last + self.timeout - time.monotonic()
      if self._stop.wait(max(wait, 0.0) + 0.01):
        return
      if self.last is None or self._held or time.monotonic() - self.last <= self.timeout:
        continue
      msg = (f"watchdog: process {jax.process_index()} on {socket.gethostname()} made no progress for "
             f"{self.timeout:g} s after {self.phase} step {self.step} (a stuck collective or a dead host); "
             f"exiting with status {EXIT_STALLED} so the job restarts from its last checkpoint.")
      logging.error(msg)
      print(msg, file=sys.stderr, flush=True)
      self._exit(EXIT_STALLED)
      return

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


class InFlight:
  """The train steps dispatched but not yet known to be complete, at most `depth` of them.

  A step's call returns before the step has run; holding the host to `depth` steps ahead keeps
  the device fed while bounding what a later host sync (metrics, a save) waits for, and lets the
  watchdog beat for each step when its outputs are ready.
  """

  def __init__(self, watchdog: Watchdog, depth: int = 2):
    self.watchdog, self.depth = watchdog, depth
    self._steps = collections.deque()

  def push(self, step: int, outputs) -> None:
    self._steps.append((step, outputs))
    while len(self._steps) > self.depth:
      self._complete()

  def drain(self) -> None:
    """Waits for every dispatched step (before a host sync, so that its wait is beaten for)."""
    while self._steps:
      self._complete()

  def _complete(self) -> None:
    step, outputs = self._steps.popleft()
    jax.block_until_ready(outputs)
    self.watchdog.beat(step)


def check_workdir(workdir):
  """The work directory as an epath, after checking it can be reached (a bucket that does not
  exist or cannot be listed is a one-line error here, before anything is written)."""
  wd = paths.resolve(workdir)
  gcsfs_log = logging.getLogger("gcsfs")
  level = gcsfs_log.level
  gcsfs_log.setLevel(logging.CRITICAL)  # its retries log tracebacks; the one line below says it all
  try:
    bucket = paths.bucket(wd)
    if bucket is not None and not bucket.exists():
      raise FileNotFoundError(f"bucket {bucket} does not exist")
    if wd.exists() and not wd.is_dir():
      raise NotADirectoryError(f"{wd} is a file")
  except Exception as e:  # gcsfs/auth raise many types: the message is what helps
    raise RuntimeError(f"Cannot use the work directory {wd}: {paths.describe(e)}. Check the path, the bucket "
                       f"name and its credentials (gcloud auth application-default login).") from None
  finally:
    gcsfs_log.setLevel(level)
  return wd


@contextlib.contextmanager
def workdir_lease(cfg, wd):
  """Process 0 holds the work directory's lease for the run; every host learns whether it did."""
  lease, err = None, None
  if jax.process_index() == 0:
    try:
      wd.mkdir(parents=True, exist_ok=True)
      lease = Lease(wd, cfg.lease.timeout_secs, cfg.lease.heartbeat_secs).acquire()
    except RuntimeError as e:
      err = e
    except Exception as e:  # permissions, unreachable storage
      err = RuntimeError(f"Cannot write the work directory {wd}: {paths.describe(e)}. Check its "
                         f"permissions (on a bucket: the account's storage.objects.create role).")
  if not shd.all_hosts(err is None):
    raise err or RuntimeError(f"Process 0 could not take the lease of {wd} (see its error); stopping.")
  try:
    yield lease
  finally:
    if lease is not None:
      lease.release()
