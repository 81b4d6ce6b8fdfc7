"""The grain input pipeline against the train step that consumes it.

  python benchmarks/input_pipeline.py                          # ImageNet policy @224, ge2mst_small step
  python benchmarks/input_pipeline.py --workers 0,2,8 --batch 64
  python benchmarks/input_pipeline.py --smoke                  # used by the tests

The source is generated: decoded uint8 images of ImageNet's typical 375x500 size (what
`tfds.data_source` hands over after decoding). The pipeline is the one train.py runs:
seeded shuffle -> random-resized crop -> flip -> RandAugment(2, 9) -> normalise -> batch,
with `workers` processes (0: in the main process). The train step's consumption rate is
measured on the same machine in the same run.
"""
import time

import bench_lib
import numpy as np

from configs import imagenet2012
from ge2mst_jax import data as data_lib


def pipeline_rate(cfg, source, batch: int, workers: int, batches: int) -> float:
  cfg.data.workers = workers
  it = iter(data_lib.train_dataset(cfg.data, batch, 0, source=source))
  next(it)  # start-up (worker processes, first reads)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t)


def main(argv=None):
  p = bench_lib.arg_parser(__doc__)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--source_hw", default="375,500")
  p.add_argument("--records", type=int, default=512)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--workers", default="0,2")
  p.add_argument("--model", default="ge2mst_small")
  p.add_argument("--step_batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3)
  a = p.parse_args(argv)
  if a.smoke:
    a.image_size, a.source_hw, a.records, a.batch, a.batches, a.workers = 16, "40,48", 32, 8, 2, "0"
    a.model, a.step_batch, a.steps = "ge2mst_tiny", 4, 1
  h, w = (int(v) for v in a.source_hw.split(","))
  rng = np.random.default_rng(0)
  source = data_lib.ArraySource(rng.integers(0, 256, (a.records, h, w, 3), dtype=np.uint8),
                                rng.integers(0, 1000, a.records).astype(np.int32))
  cfg = imagenet2012.get_config("small")
  cfg.data.image_size = a.image_size
  rows = [{"stage": f"grain pipeline, {wk} worker processes", "workers": int(wk), "batch": a.batch,
           "images_per_s": pipeline_rate(cfg, source, a.batch, int(wk), a.batches)} for wk in a.workers.split(",")]
  ts = bench_lib.TrainStep(bench_lib.train_config(a.model, a.step_batch, a.image_size))
  step_rate = a.step_batch / ts.run(a.steps)
  rows.append({"stage": f"train step {a.model} @{a.image_size}", "workers": None, "batch": a.step_batch,
               "images_per_s": step_rate})
  for r in rows:
    r["vs_train_step"] = r["images_per_s"] / step_rate
  bench_lib.print_table(rows, [("stage", "stage", "s"), ("batch", "batch", "d"), ("img/s", "images_per_s", ".1f"),
                               ("x train step", "vs_train_step", ".2f")])
  print(f"wrote {bench_lib.record('input_pipeline', rows, a.smoke, a.out, source_hw=[h, w], records=a.records)}")


if __name__ == "__main__":
  main()
