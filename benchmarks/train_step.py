"""Train-step throughput against this machine's own dense-matmul rate.

  python benchmarks/train_step.py                         # tiny @32 (batch 64) and small @224 (batch 16)
  python benchmarks/train_step.py --models ge2mst_small --batch 32 --dtype bfloat16 --steps 10
  python benchmarks/train_step.py --smoke                 # tiny sizes, one repeat (used by the tests)

Model FLOPs are counted from the network, not measured: forward MACs x 2 (multiply + add)
x 3 (forward + backward), the usual convention. The matmul rate is a large float32 (or
bf16) `jnp.dot` through JAX on the same devices, measured in the same run; their ratio is
the figure we optimise, since absolute times vary from machine to machine.
"""

import bench_lib
import jax.numpy as jnp
import numpy as np

from ge2mst_jax.evaluate import energy


def bench_model(name: str, batch: int, steps: int, dtype: str, image_size: int | None = None, **arch) -> dict:
  return bench_step(bench_lib.TrainStep(bench_lib.train_config(name, batch, image_size, dtype=dtype, **arch)), steps)


def bench_step(ts: bench_lib.TrainStep, steps: int) -> dict:
  """The row of a compiled train step timed over `steps` steps (`step_times_s`: each step's seconds)."""
  times = ts.times(steps)
  dt, batch, size = float(np.median(times)), ts.cfg.batch_size, ts.cfg.data.image_size
  macs = energy.model_macs(ts.model(), (size, size, 3))["macs_per_image"]
  flops = macs * 2 * 3 * batch / dt   # forward MACs x (multiply + add) x (forward + backward)
  return {"model": ts.cfg.model.name, "depths": list(ts.cfg.model.arch.depths), "image_size": size, "batch": batch,
          "dtype": ts.cfg.model.arch.dtype, "step_s": dt, "step_times_s": times, "images_per_s": batch / dt,
          "model_flops_per_s": flops, "model_gflops_per_s": flops / 1e9,
          "macs_per_image": macs, "trace_s": ts.trace_s, "compile_s": ts.compile_s, **ts.memory()}


def main(argv=None):
  p = bench_lib.add_arch_options(bench_lib.arg_parser(__doc__))
  p.add_argument("--models", default="ge2mst_tiny,ge2mst_small")
  p.add_argument("--batch", default="64,16", help="one batch size per model")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--matmul_n", type=int, default=2048)
  a = p.parse_args(argv)
  names, batches = a.models.split(","), [int(b) for b in a.batch.split(",")]
  size = None
  if a.smoke:  # the same tiny step as the other benchmarks' smoke runs: compiled once, cached
    names, batches, a.steps, a.matmul_n, size = ["ge2mst_tiny"], [4], 1, 256, 16
  peak = bench_lib.matmul_rate(a.matmul_n, jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32)
  rows = []
  for name, batch in zip(names, batches + batches[-1:] * len(names)):
    r = bench_model(name, batch, a.steps, a.dtype, size, **bench_lib.arch_overrides(a))
    r["fraction_of_matmul_rate"] = r["model_flops_per_s"] / peak
    rows.append(r)
  bench_lib.print_table(rows, [("model", "model", "s"), ("size", "image_size", "d"), ("batch", "batch", "d"),
                               ("step s", "step_s", ".3f"), ("img/s", "images_per_s", ".1f"),
                               ("GFLOP/s", "model_gflops_per_s", ".2f"), ("of matmul", "fraction_of_matmul_rate", ".1%"),
                               ("trace s", "trace_s", ".1f"), ("compile s", "compile_s", ".1f")])
  print(f"dense {a.dtype} matmul ({a.matmul_n}^3): {peak / 1e9:.1f} GFLOP/s")
  path = bench_lib.record("train_step", rows, a.smoke, a.out, matmul_flops_per_s=peak, matmul_n=a.matmul_n,
                          flops_convention="forward MACs x 2 x 3 (forward + backward)")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
