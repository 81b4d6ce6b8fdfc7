"""Metric writers: JSONL always, TensorBoard event files (tensorboardX, no TensorFlow), and a
progress bar on an interactive terminal or plain periodic lines otherwise. Process 0 only."""
from __future__ import annotations

import json
import os
import sys
import time

import jax


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, quiet: bool = False):
    self.enabled = jax.process_index() == 0
    self.total, self.quiet = total_steps, quiet
    self.jsonl = self.tb = self.bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
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
