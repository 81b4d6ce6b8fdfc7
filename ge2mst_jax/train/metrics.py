"""Metric writers: JSONL always, TensorBoard event files (tensorboardX, no TensorFlow), and a
progress bar on an interactive terminal or plain periodic lines otherwise. Process 0 only.

`metrics.jsonl` is appended to, line by line, on a local disk. An object in a bucket cannot be
appended to: there the file is rewritten whole (what earlier runs wrote, then this run's
records) at most every `flush_secs` and when the writer closes. Each upload replaces the object
atomically, so a reader never sees a cut line; a run killed without warning loses at most the
last `flush_secs` of records (its checkpoints are unaffected).
"""
from __future__ import annotations

import json
import sys
import time

import jax
from etils import epath

from ge2mst_jax.io import paths

METRICS_FILE = "metrics.jsonl"


class _ObjectLog:
  """An append-only file kept as one object in a bucket: read once, rewritten whole on flush
  (at most every `flush_secs` while writing, and on close)."""

  def __init__(self, path, flush_secs: float):
    self.path, self.flush_secs = epath.Path(path), flush_secs
    self.data = self.path.read_bytes() if self.path.exists() else b""
    self.dirty, self.last = False, time.monotonic()

  def write(self, data: str | bytes) -> None:
    self.data += data.encode() if isinstance(data, str) else data
    self.dirty = True
    if time.monotonic() - self.last >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    if self.dirty:
      self.path.write_bytes(self.data)
      self.dirty, self.last = False, time.monotonic()

  def close(self) -> None:
    self.flush()


class _ObjectRecordWriterFactory:
  """tensorboardX's writer factory for event files in a bucket; tensorboardX flushes them itself."""

  def open(self, path):
    return _ObjectLog(path, flush_secs=float("inf"))

  def directory_check(self, path):
    del path  # object stores have no directories to create


def _register_bucket_event_writer() -> None:
  # tensorboardX's own gs:// writer needs google-cloud-storage and re-uploads from __del__
  # (at interpreter exit, possibly after the storage is gone); epath is what we use everywhere.
  from tensorboardX import record_writer
  record_writer.register_writer_factory("gs", _ObjectRecordWriterFactory())


class MetricWriter:
  def __init__(self, workdir, total_steps: int, initial_step: int = 0, quiet: bool = False,
               flush_secs: float = 30.0):
    self.enabled = jax.process_index() == 0
    self.total, self.quiet = total_steps, quiet
    self.jsonl = self.tb = self.bar = None
    if not self.enabled:
      return
    wd = epath.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if paths.is_remote(wd):
      self.jsonl = _ObjectLog(wd / METRICS_FILE, flush_secs)
    else:
      self.jsonl = open(wd / METRICS_FILE, "a", buffering=1)  # a local file: line-buffered appends
    try:
      from tensorboardX import SummaryWriter
      if paths.is_remote(wd):
        _register_bucket_event_writer()
      self.tb = SummaryWriter(str(wd / "tb"), flush_secs=int(flush_secs))
    except ImportError:  # TensorBoard files are a convenience; JSONL is the record
      self.tb = None
    if sys.stdout.isatty() and not quiet:
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict, kind: str = "train") -> None:
    if not self.enabled:
      return
    rec = {"step": int(step), "kind": kind, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(rec) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))
    text = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
    if self.bar is not None:
      if kind == "train":
        self.bar.set_postfix_str(text, refresh=False)
      else:
        self.bar.write(f"[{kind} @ {step}] {text}")
    elif not self.quiet:
      print(f"[{kind} {step}/{self.total}] {text}", flush=True)

  def advance(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def log(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()
