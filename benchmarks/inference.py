"""Spike-mode against quantize-mode inference, and SOPs against FLOPs, at T = 4.

  python benchmarks/inference.py                      # ge2mst_tiny @32 (batch 64), ge2mst_small @224 (batch 8)
  python benchmarks/inference.py --models ge2mst_tiny --batch 256 --T 8
  python benchmarks/inference.py --smoke              # used by the tests

Both modes compute the same function from the same weights: quantize mode as one dense
pass on the decoded activations, spike mode as T binary (ternary) spike steps through
every synaptic layer with BatchNorm folded in, exactly as a spiking chip would. SOPs are
counted from the spikes of the same images; FLOPs are the dense pass's MACs x 2.
"""

import bench_lib
import jax
import numpy as np
from flax import nnx

from ge2mst_jax import energy, models


def bench(name: str, batch: int, T: int, K: int, steps: int, image_size: int | None) -> dict:
  model = models.create_model(name, 10 if (image_size or models.arch_config(name).image_size) < 224 else 1000,
                              nnx.Rngs(0), T=T, K=K, **({"image_size": image_size} if image_size else {}))
  model.eval()
  size = model.cfg.image_size
  images = bench_lib.synthetic_batch(batch, size, 10)["image"]
  graphdef, state = nnx.split(model)
  row = {"model": name, "image_size": size, "batch": batch, "T": T, "K": K}
  for mode in ("quantize", "spike"):
    fwd = jax.jit(lambda s, x, mode=mode: nnx.merge(graphdef, s)(x, mode=mode))
    jax.block_until_ready(fwd(state, images))
    dt = float(np.median([bench_lib.timed(lambda: fwd(state, images)) for _ in range(steps)]))
    row[f"{mode}_s"], row[f"{mode}_images_per_s"] = dt, batch / dt
  row["spike_over_quantize"] = row["spike_s"] / row["quantize_s"]
  rep = energy.energy_report(model, images[:min(batch, 16)])
  row["sops_per_image"], row["flops_per_image"] = rep["sops_per_image"], rep["flops_per_image"]
  row["sops_over_flops"] = rep["sops_per_image"] / rep["flops_per_image"]
  row["energy_mj_per_image"], row["ann_energy_mj_per_image"] = rep["energy_mj_per_image"], rep["ann_energy_mj_per_image"]
  row["mean_firing_rate"] = rep["mean_firing_rate"]
  return row


def main():
  p = bench_lib.arg_parser(__doc__)
  p.add_argument("--models", default="ge2mst_tiny,ge2mst_small")
  p.add_argument("--batch", default="64,8", help="one batch size per model")
  p.add_argument("--T", type=int, default=4)
  p.add_argument("--K", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  names, batches = a.models.split(","), [int(b) for b in a.batch.split(",")]
  size = None
  if a.smoke:
    names, batches, a.steps, size = ["ge2mst_tiny"], [4], 1, 16
  rows = [bench(n, b, a.T, a.K, a.steps, size) for n, b in zip(names, batches + batches[-1:] * len(names))]
  bench_lib.print_table(rows, [("model", "model", "s"), ("size", "image_size", "d"), ("batch", "batch", "d"),
                               ("quant img/s", "quantize_images_per_s", ".1f"),
                               ("spike img/s", "spike_images_per_s", ".1f"), ("spike/quant", "spike_over_quantize", ".2f"),
                               ("SOPs/img", "sops_per_image", ".4g"), ("FLOPs/img", "flops_per_image", ".4g"),
                               ("SOP/FLOP", "sops_over_flops", ".3f")])
  print(f"wrote {bench_lib.record('inference', rows, a.smoke, a.out)}")


if __name__ == "__main__":
  main()
