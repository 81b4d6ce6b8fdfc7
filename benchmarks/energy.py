"""Energy per image of a Ge2mS-T network with random weights under the three energy models
(docs/energy.md): the paper's convention, the spiking execution's hardware model and the quantized
ANN's, with weight reuse on and off, on synthetic images. Writes results/energy.json.

  python benchmarks/energy.py                      # ge2mst_small at 224², 2 images
  python benchmarks/energy.py --smoke              # ge2mst_tiny at 16², checks the script runs

Random weights fire otherwise than trained ones: these rows show what the models count on the
full-size network, not what a trained network costs (eval.py reports that for a checkpoint).
"""
import subprocess

import bench_lib  # first: it re-executes with huge pages before JAX is imported

import jax

from ge2mst_jax.evaluate import energy, hardware
from ge2mst_jax.io import energy_table
from ge2mst_jax.nn import models


def commit() -> str:
  """The checkout's commit ('' outside a git checkout), so a row names the code that made it."""
  r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                     cwd=bench_lib.RESULTS)
  return r.stdout.strip() if r.returncode == 0 else ""


def bench(name: str, images: int, size: int | None, T: int, K: int, **arch) -> dict:
  overrides = dict(arch, T=T, K=K, **({"image_size": size} if size else {}))
  model = models.create_model(name, 1000 if size is None else 10, 0, **overrides)
  model.eval()
  size = model.cfg.image_size
  x = bench_lib.synthetic_batch(images, size, 10)["image"]
  rep = energy.energy_report(model, x)
  counts = rep["hardware_energy"]["counts"]
  row = {"model": name, "depths": list(model.cfg.depths), "image_size": size, "T": T, "K": K, "images": images,
         "weights": "random (seed 0)", "sops_per_image": rep["sops_per_image"], "macs_per_image": rep["macs_per_image"],
         "commit": commit()}
  table = energy_table.table().to_dict()
  for reuse in (True, False):
    res = hardware.apply(counts, {**table, "reuse": reuse})
    tag = "" if reuse else "_no_reuse"
    for m in hardware.MODELS:
      row[f"{m}_uj{tag}"] = res["models"][m]["total_mj"] * 1e3
    row[f"cheaper{tag}"] = res["cheaper"]
  return row


def main(argv=None):
  p = bench_lib.add_arch_options(bench_lib.arg_parser(__doc__))
  p.add_argument("--models", default="ge2mst_small")
  p.add_argument("--images", type=int, default=2)
  p.add_argument("--T", type=int, default=4)
  p.add_argument("--K", type=int, default=2)
  a = p.parse_args(argv)
  names, size = a.models.split(","), None
  if a.smoke:
    names, size, a.images = ["ge2mst_tiny"], 16, 1
  arch = bench_lib.arch_overrides(a)
  rows = [bench(n, a.images, size, a.T, a.K, **arch) for n in names]
  bench_lib.print_table(rows, [("model", "model", "s"), ("size", "image_size", "d"), ("SOPs/img", "sops_per_image", ".4g"),
                               ("paper µJ", "paper_uj", ".1f"), ("SNN µJ", "snn_uj", ".1f"), ("QANN µJ", "qann_uj", ".1f"),
                               ("cheaper", "cheaper", "s"), ("SNN µJ no reuse", "snn_uj_no_reuse", ".1f"),
                               ("QANN µJ no reuse", "qann_uj_no_reuse", ".1f")])
  print(f"wrote {bench_lib.record('energy', rows, a.smoke, a.out)}")


if __name__ == "__main__":
  main()
