"""What every benchmark shares: the machine's own matmul rate, a jitted train step on
synthetic data, timing, and the JSON record with the machine, device, versions, date and commit."""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ge2mst_jax.io import hugepages

hugepages.reexec_with_huge_pages()  # every benchmark is a script that imports this first: measure as train.py runs

import jax
import jax.numpy as jnp
import numpy as np

from configs import common as config_common
from ge2mst_jax.nn import models
from ge2mst_jax.train import sharding as shd, loop as train_lib, state as train_state

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def arg_parser(doc: str) -> argparse.ArgumentParser:
  """A benchmark's command line, with the options every benchmark has: --smoke and --out."""
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script runs")
  p.add_argument("--out", default=RESULTS, help="directory of the JSON result")
  # Acted on at import, before the parser (hugepages.reexec_with_huge_pages); here for --help.
  p.add_argument(f"--{hugepages.FLAG}", choices=hugepages.MODES, default="auto", help=hugepages.HELP)
  return p


def add_arch_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The architecture options of the benchmarks that build their networks here (`arch_overrides`)."""
  p.add_argument("--depths", default="", help="blocks per stage, e.g. 1,1,0,0 (default: the model's own)")
  return p


# The smoke runs' network: the model's widths with Stage 1's block only (the other stages only
# downsample). The smoke runs check that the scripts run and write their JSON; the blocks themselves
# are the model tests'. At depths 1,1,0,0 the four smoke runs took about twice the CPU time.
SMOKE_DEPTHS = "1,0,0,0"


def arch_overrides(a: argparse.Namespace) -> dict:
  """The architecture options given on the command line (`--depths`; `SMOKE_DEPTHS` under --smoke
  unless given), for `train_config` and `models.create_model`."""
  depths = a.depths or (SMOKE_DEPTHS if a.smoke else "")
  return {"depths": tuple(int(d) for d in depths.split(","))} if depths else {}


def matmul_rate(n: int, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a dense `n x n` matmul through JAX on the default device (best of `repeats`)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(timed(lambda: f(a)) for _ in range(repeats))
  return 2 * n ** 3 / best


def timed(fn) -> float:
  """Seconds of one call of `fn`, waiting for its result."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def synthetic_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, num_classes, batch).astype(np.int32)}


def train_config(name: str, batch: int, image_size: int | None = None, **arch):
  """A training config for `name` on synthetic data (1000 classes at 224², else 10)."""
  size = image_size or models.arch_config(name).image_size
  cfg = config_common.base_config(name, dataset="synthetic", num_classes=1000 if size >= 224 else 10,
                                  image_size=size, **arch)
  cfg.batch_size, cfg.total_steps = batch, 1000
  return cfg


class TrainStep:
  """A compiled train step with its state and one synthetic batch on a one-axis mesh."""

  def __init__(self, cfg):
    self.cfg = cfg
    self.mesh = shd.make_mesh(1)
    self.setup = train_state.create_train_state(cfg, self.mesh)
    self.step = train_lib.make_train_step(cfg, self.setup)
    size = cfg.data.image_size
    self.batch = shd.global_batch(synthetic_batch(cfg.batch_size, size, cfg.data.num_classes), self.mesh)
    self.state = self.setup.state
    t = time.perf_counter()
    traced = self.step.trace(self.state, self.batch)   # Python: what every process pays at start
    self.trace_s = time.perf_counter() - t
    self.compiled = traced.lower().compile()
    self.compile_s = time.perf_counter() - t - self.trace_s

  def run(self, steps: int) -> float:
    """Median seconds per step over `steps` steps, after one warm-up step."""
    return float(np.median(self.times(steps)))

  def times(self, steps: int) -> list[float]:
    """Seconds of each of `steps` steps, after one warm-up step."""
    self.step_once()
    return [self.step_once() for _ in range(steps)]

  def step_once(self) -> float:
    """Seconds of one train step, waiting for its metrics."""
    t = time.perf_counter()
    self.state, m = self.compiled(self.state, self.batch)
    jax.block_until_ready(m)
    return time.perf_counter() - t

  def memory(self) -> dict:
    """XLA's compiled memory analysis (deterministic): bytes of arguments, outputs, temporaries."""
    ma = self.compiled.memory_analysis()
    args, out, temp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = ma.alias_size_in_bytes
    return {"argument_bytes": int(args), "output_bytes": int(out), "temp_bytes": int(temp),
            "alias_bytes": int(alias), "peak_bytes": int(args + out + temp - alias)}

  def model(self):
    model, _ = train_state.model_and_optimizer(self.setup.graphdef, self.state)
    model.eval()
    return model


def interleaved_medians(steppers: list, rounds: int, per_round: int = 2) -> list:
  """Median seconds of each of `steppers` (callables timing one step), timed in turn, round after
  round: drift in the machine's speed (a shared VM drifts by 10-20 % over minutes) then falls on
  every configuration alike instead of biasing the ratios between them. Within a round each
  configuration first takes one untimed step: the first step after another configuration ran
  pays for its caches and freshly mapped memory (measured: up to 2x for a small step after a big one)."""
  times = [[] for _ in steppers]
  for _ in range(rounds):
    for ts, step in zip(times, steppers):
      step()
      ts.extend(step() for _ in range(per_round))
  return [float(np.median(t)) for t in times]


def source_commit() -> str | None:
  """The checkout's commit (short hash, `+` when tracked files differ from it), or None outside git:
  docs/benchmarks.md shows it beside each row, so a figure names the code it measured."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def header(name: str, smoke: bool) -> dict:
  """What every result records first: the benchmark, date, commit, machine, device and versions."""
  import flax
  return {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": source_commit(),
          "machine": platform.node(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "platform": jax.devices()[0].platform, "jax": jax.__version__,
          "flax": flax.__version__, "python": platform.python_version(), "smoke": smoke}


def record(name: str, rows: list, smoke: bool, out_dir: str, **extra) -> str:
  """Writes `{out_dir}/{name}[_smoke].json` with the machine, device, versions, date and commit; returns its path."""
  result = {**header(name, smoke), **extra, "rows": rows}
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name + ("_smoke" if smoke else "") + ".json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return path


def print_table(rows: list, columns: list) -> None:
  """`columns`: (header, key, format) triples; a row without the key (or None) shows '-'."""
  print("  ".join(f"{h:>{max(len(h), 8)}s}" for h, _, _ in columns))
  for r in rows:
    cell = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)
    print("  ".join(f"{cell(k, fmt):>{max(len(h), 8)}s}" for h, k, fmt in columns))
