"""Waiting on the processes a test starts by their progress, never by a fixed clock: on a loaded
machine a correct run is slow, not wrong. A test gives up only when nothing has moved for
`STALL` seconds (no file in the work directory written, no process ended)."""
import os
import threading
import time

import pytest

STALL = 600.0


def activity(*workdirs) -> tuple:
  """What has been written under the work directories (names and sizes), the lease's heartbeat
  aside: it beats while a hung run does nothing."""
  seen = []
  for wd in workdirs:
    for root, _, files in os.walk(wd):
      for name in files:
        if name != "lease.json":
          try:
            seen.append((os.path.join(root, name), os.path.getsize(os.path.join(root, name))))
          except OSError:  # removed while we looked (orbax's temporary files)
            pass
  return tuple(sorted(seen))


def wait_until(cond, procs, what: str, progress=lambda: None, stall: float = STALL) -> None:
  """Returns once `cond()` holds or any process has ended; fails when `progress()` stays the same
  for `stall` seconds before that."""
  last, moved, looked = progress(), time.time(), time.time()
  while not cond():
    if any(p.poll() is not None for p in procs):
      return
    if time.time() - looked >= 1.0:  # the directory walk once a second: the runs need the cores
      now, looked = progress(), time.time()
      if now != last:
        last, moved = now, looked
      elif looked - moved > stall:
        pytest.fail(f"no progress for {stall:.0f} s while waiting for {what}")
    time.sleep(0.05)


def finish(procs, what: str, progress=lambda: None, stall: float = STALL) -> list[tuple[str, str]]:
  """`(stdout, stderr)` of every process once all have ended (their pipes drained meanwhile);
  kills them and fails when `progress()` stays the same for `stall` seconds."""
  outs = [None] * len(procs)
  readers = [threading.Thread(target=lambda i=i, p=p: outs.__setitem__(i, p.communicate()), daemon=True)
             for i, p in enumerate(procs)]
  for r in readers:
    r.start()
  last, moved = (progress(), 0), time.time()
  while any(r.is_alive() for r in readers):
    now = (progress(), sum(not r.is_alive() for r in readers))
    if now != last:
      last, moved = now, time.time()
    elif time.time() - moved > stall:
      for p in procs:
        p.kill()
      for r in readers:
        r.join()
      pytest.fail(f"no progress for {stall:.0f} s while waiting for {what}")
    time.sleep(1.0)
  return outs
