"""The grain input pipeline against the train step that consumes it.

  python benchmarks/input_pipeline.py                          # both sources, ImageNet policy @224
  python benchmarks/input_pipeline.py --source jpeg --workers 0,2,8 --batch 64
  python benchmarks/input_pipeline.py --smoke                  # used by the tests

Sources:
  decoded  uint8 arrays of ImageNet's typical 375x500 size in memory (what `tfds.data_source`
           hands over when tfds decodes).
  jpeg     a real tfds ArrayRecord data set of JPEGs (quality 90, sides 333..500 px, built by
           `tests.jpeg_records` into a temporary directory) read through `tfds.data_source`
           as ImageNet is, the encoded bytes going to the workers (`data.decode_in_workers`),
           which decode each at its crop's scale.

The pipeline is the one train.py runs with the ImageNet config: seeded shuffle -> random-resized
crop -> flip -> RandAugment `rand-m9-mstd0.5-inc1` -> normalise -> random erasing 0.25 -> batch,
with `workers` processes (0: in the main process, on `read_threads` threads); each row also
runs without RandAugment and erasing. `images_per_s_per_core` is images per CPU-second, the CPU
time of this process and all its children (the workers) read from /proc: what a host with more
cores multiplies. The first row of each source is the record transform alone in one process,
no grain. Evaluation rows: the ImageNet evaluation transform (centre crop, resize @224) over the
JPEG validation split through `data.eval_batches`. The train step's consumption rate is measured
on the same machine in the same run.
"""
import contextlib
import os
import resource
import tempfile
import time

import bench_lib
import numpy as np

from configs import imagenet2012
from ge2mst_jax.data import pipeline as data_lib
from tests import jpeg_records

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
  """User + system CPU seconds of this process, every live (or exited, unreaped) descendant
  (grain's workers) and every reaped child: workers that end within a measurement count."""
  def tree(pid):
    yield pid
    for task in os.listdir(f"/proc/{pid}/task"):
      with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
        for child in f.read().split():
          yield from tree(int(child))
  total = 0
  for pid in set(tree(os.getpid())):
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])     # utime, stime
  reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
  return total / CLK_TCK + reaped.ru_utime + reaped.ru_stime


def measured(images: int, fn) -> dict:
  t, c = time.perf_counter(), cpu_seconds()
  fn()
  wall, cpu = time.perf_counter() - t, cpu_seconds() - c
  per_core = images / cpu if cpu >= 10 / CLK_TCK else None   # below the clock's resolution: unmeasured
  return {"images_per_s": images / wall, "images_per_s_per_core": per_core, "cpu_seconds": cpu}


def pipeline_row(cfg, source, batch: int, workers: int, batches: int) -> dict:
  cfg.data.workers = workers
  it = iter(data_lib.train_dataset(cfg.data, batch, 0, source=source))
  next(it)  # start-up (worker processes, first reads)
  row = measured(batches * batch, lambda: [next(it) for _ in range(batches)])
  del it
  return {"workers": workers, **row}


def transform_row(cfg, source, n: int) -> dict:
  """The per-record work alone, one process, no grain: the ceiling of images per CPU-second."""
  prep = data_lib._preprocess(cfg.data, True)
  rng = np.random.default_rng(0)
  for i in range(8):   # warm-up: first-call costs (imports, PIL's plugin registry, first page faults)
    prep.random_map(source[i % len(source)], rng)
  return {"workers": None, **measured(n, lambda: [prep.random_map(source[i % len(source)], rng) for i in range(n)])}


def eval_row(cfg, batch: int, workers: int) -> dict:
  """The evaluation pass after its first batch (start-up: worker processes, first reads), with
  the workers still alive when the CPU time is read."""
  cfg.data.workers = workers
  it = data_lib.eval_batches(cfg.data, batch, 1)
  next(it)
  n = data_lib.num_examples(cfg.data, "test") - batch
  row = measured(n, lambda: list(it))
  del it
  return {"workers": workers, **row}


def main(argv=None):
  p = bench_lib.add_arch_options(bench_lib.arg_parser(__doc__))
  p.add_argument("--source", default="decoded,jpeg", help="comma-separated: decoded, jpeg")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--source_hw", default="375,500", help="decoded source's image size")
  p.add_argument("--jpeg_sides", default="333,500", help="jpeg source's side range")
  p.add_argument("--records", type=int, default=512)
  p.add_argument("--eval_records", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--workers", default="0,2")
  p.add_argument("--model", default="ge2mst_small")
  p.add_argument("--step_batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3)
  a = p.parse_args(argv)
  if a.smoke:
    a.image_size, a.source_hw, a.jpeg_sides, a.records, a.eval_records = 16, "40,48", "40,48", 16, 16
    a.batch, a.batches, a.workers, a.model, a.step_batch, a.steps = 8, 1, "0", "ge2mst_tiny", 4, 1
  h, w = (int(v) for v in a.source_hw.split(","))
  cfg = imagenet2012.get_config("small")
  cfg.data.image_size = a.image_size
  recipe = (cfg.data.randaugment, cfg.data.random_erasing)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for source_name in a.source.split(","):
      if source_name == "decoded":
        rng = np.random.default_rng(0)
        source = data_lib.ArraySource(rng.integers(0, 256, (a.records, h, w, 3), dtype=np.uint8),
                                      rng.integers(0, 1000, a.records).astype(np.int32))
        cfg.data.decode_in_workers = False
      elif source_name == "jpeg":
        jpeg_records.build(tmp, train=a.records, validation=a.eval_records,
                           size_range=tuple(int(v) for v in a.jpeg_sides.split(",")), quality=90)
        cfg.data.name, cfg.data.data_dir, cfg.data.decode_in_workers = jpeg_records.NAME, tmp, True
        source = data_lib.make_source(cfg.data, "train")
      else:
        raise SystemExit(f"--source {source_name!r}: use decoded or jpeg.")
      for ra, erasing in (recipe, ("", 0.0)):
        cfg.data.randaugment, cfg.data.random_erasing = ra, erasing
        aug = "RRC+flip" + (f"+{ra}+erasing{erasing}" if ra else "")
        common = {"source": source_name, "augment": aug, "batch": a.batch}
        rows.append({"stage": f"{source_name}: record transform, 1 process", **common,
                     **transform_row(cfg, source, a.batch * a.batches)})
        rows += [{"stage": f"{source_name}: grain pipeline, {wk} worker processes", **common,
                  **pipeline_row(cfg, source, a.batch, int(wk), a.batches)} for wk in a.workers.split(",")]
      if source_name == "jpeg":
        rows += [{"stage": f"jpeg: evaluation input, {wk} worker processes", "source": "jpeg",
                  "augment": "eval: centre crop 87.5% + resize", "batch": a.batch,
                  **eval_row(cfg, a.batch, int(wk))} for wk in a.workers.split(",")]
  ts = bench_lib.TrainStep(bench_lib.train_config(a.model, a.step_batch, a.image_size, **bench_lib.arch_overrides(a)))
  step_rate = a.step_batch / ts.run(a.steps)
  rows.append({"stage": f"train step {a.model} @{a.image_size}", "depths": list(ts.cfg.model.arch.depths),
               "workers": None, "batch": a.step_batch, "images_per_s": step_rate})
  for r in rows:
    r["vs_train_step"] = r["images_per_s"] / step_rate
  bench_lib.print_table(rows, [("stage", "stage", "s"), ("augment", "augment", "s"), ("batch", "batch", "d"),
                               ("img/s", "images_per_s", ".1f"), ("img/s/core", "images_per_s_per_core", ".1f"),
                               ("x train step", "vs_train_step", ".2f")])
  path = bench_lib.record("input_pipeline", rows, a.smoke, a.out, source_hw=[h, w], records=a.records,
                          jpeg_sides=[int(v) for v in a.jpeg_sides.split(",")], eval_records=a.eval_records)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
