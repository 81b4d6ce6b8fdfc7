"""Train-step throughput against this machine's own dense-matmul rate.

  python benchmarks/train_step.py                         # tiny @32 (batch 64) and small @224 (batch 8)
  python benchmarks/train_step.py --models ge2mst_small --batch 32 --dtype bfloat16 --steps 10
  python benchmarks/train_step.py --smoke                 # tiny sizes, one repeat (used by the tests)

Model FLOPs are counted from the network, not measured: forward MACs x 2 (multiply + add)
x 3 (forward + backward), the usual convention. The matmul rate is a large float32 (or
bf16) `jnp.dot` through JAX on the same devices, measured in the same run; their ratio is
the figure we optimise, since absolute times vary from machine to machine.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ge2mst_jax import energy, models, sharding as shd, train_lib


def matmul_rate(n: int, dtype, repeats: int = 5) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def bench_model(name: str, batch: int, steps: int, dtype: str) -> dict:
  size = models.arch_config(name).image_size
  cfg = common.base_config(name, dataset="synthetic", num_classes=1000 if size == 224 else 10, image_size=size,
                           dtype=dtype)
  cfg.batch_size, cfg.total_steps = batch, 1000
  mesh = shd.make_mesh(1)
  setup = train_lib.create_train_state(cfg, mesh)
  step = train_lib.make_train_step(cfg, setup)
  rng = np.random.default_rng(0)
  batch_np = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              "label": rng.integers(0, cfg.data.num_classes, batch).astype(np.int32)}
  state = setup.state
  t = time.perf_counter()
  state, m = step(state, shd.global_batch(batch_np, mesh))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, shd.global_batch(batch_np, mesh))
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / steps
  model, _ = __import__("flax").nnx.merge(setup.graphdef, state)
  macs = energy.model_macs(model, (size, size, 3))["macs_per_image"]
  flops = macs * 2 * 3 * batch / dt
  return {"model": name, "image_size": size, "batch": batch, "dtype": dtype, "step_s": dt,
          "images_per_s": batch / dt, "model_flops_per_s": flops, "macs_per_image": macs, "compile_s": compile_s}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="ge2mst_tiny,ge2mst_small")
  p.add_argument("--batch", default="64,8", help="one batch size per model")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script runs")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  a = p.parse_args()
  names, batches = a.models.split(","), [int(b) for b in a.batch.split(",")]
  if a.smoke:
    names, batches, a.steps, a.matmul_n = ["ge2mst_tiny"], [8], 1, 256
  peak = matmul_rate(a.matmul_n, jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32)
  rows = []
  for name, batch in zip(names, batches + batches[-1:] * len(names)):
    r = bench_model(name, batch, a.steps, a.dtype)
    r["fraction_of_matmul_rate"] = r["model_flops_per_s"] / peak
    rows.append(r)
  result = {"benchmark": "train_step", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__, "matmul_flops_per_s": peak,
            "matmul_n": a.matmul_n, "smoke": a.smoke, "rows": rows}
  print(f"{'model':14s} {'size':>4s} {'batch':>5s} {'step s':>8s} {'img/s':>8s} {'GFLOP/s':>9s} {'of matmul':>9s}")
  for r in rows:
    print(f"{r['model']:14s} {r['image_size']:4d} {r['batch']:5d} {r['step_s']:8.3f} {r['images_per_s']:8.1f} "
          f"{r['model_flops_per_s'] / 1e9:9.2f} {100 * r['fraction_of_matmul_rate']:8.1f}%")
  print(f"dense {a.dtype} matmul ({a.matmul_n}^3): {peak / 1e9:.1f} GFLOP/s on {result['device_kind']}")
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "train_step" + ("_smoke" if a.smoke else "") + ".json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
