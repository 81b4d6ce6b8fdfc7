"""Spike-mode against quantize-mode inference, and SOPs against FLOPs, at T = 4.

  python benchmarks/inference.py                      # ge2mst_tiny @32 (batch 64), ge2mst_small @224 (batch 8)
  python benchmarks/inference.py --models ge2mst_tiny --batch 256 --T 8
  python benchmarks/inference.py --smoke              # used by the tests

Both modes compute the same function from the same weights: quantize mode as one dense
pass on the decoded activations, spike mode as T binary (ternary) spike steps through
every synaptic layer and attention product, exactly as a spiking chip would, and
spike mode with `spike_integration='code'` (the same spikes, each synaptic layer applied
once to the decoded train: the same linear sum regrouped). The three are timed in turn,
round after round. SOPs are counted from the spikes of the same images; FLOPs are the dense
pass's MACs x 2.

The evaluator row times what eval.py and the in-training evaluation run, end to end:
`evaluators.evaluate` over a tfds ArrayRecord set of JPEGs (`--eval_records` images, ImageNet's
evaluation transform, the grain pipeline) into the jitted step that runs both modes and folds
the metrics on device, against the two forward passes' time for the same images.
"""
import tempfile
import time

import bench_lib
import jax
import numpy as np
from flax import nnx

from tests import jpeg_records
from ge2mst_jax.evaluate import energy
from ge2mst_jax.train import evaluator as evaluators, state as train_state
from ge2mst_jax.nn import models
from ge2mst_jax.train import sharding as shd


def bench(name: str, batch: int, T: int, K: int, steps: int, image_size: int | None, **arch) -> dict:
  num_classes = 10 if (image_size or models.arch_config(name).image_size) < 224 else 1000
  size_kw = {"image_size": image_size} if image_size else {}
  # Same seed, same weights: the integration is a static choice of the spike trains.
  model, code_model = (models.create_model(name, num_classes, nnx.Rngs(0), T=T, K=K, spike_integration=i,
                                           **size_kw, **arch) for i in ("steps", "code"))
  size = model.cfg.image_size
  images = bench_lib.synthetic_batch(batch, size, 10)["image"]
  row = {"model": name, "depths": list(model.cfg.depths), "image_size": size, "batch": batch, "T": T, "K": K}
  fwds = {}
  for key, m, mode in (("quantize", model, "quantize"), ("spike", model, "spike"),
                       ("spike_code", code_model, "spike")):
    m.eval()
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda s, x, g=graphdef, mode=mode: nnx.merge(g, s)(x, mode=mode))
    fwds[key] = lambda f=f, s=state: f(s, images)
  times = bench_lib.interleaved_medians([lambda f=f: bench_lib.timed(f) for f in fwds.values()], steps, per_round=1)
  for key, dt in zip(fwds, times):
    row[f"{key}_s"], row[f"{key}_images_per_s"] = dt, batch / dt
  row["spike_over_quantize"] = row["spike_s"] / row["quantize_s"]
  row["spike_code_over_quantize"] = row["spike_code_s"] / row["quantize_s"]
  logits = {k: np.asarray(f()) for k, f in fwds.items()}
  row["code_vs_steps_max_abs_logit_diff"] = float(np.max(np.abs(logits["spike_code"] - logits["spike"])))
  rep = energy.energy_report(model, images[:min(batch, 16)])
  row["sops_per_image"], row["flops_per_image"] = rep["sops_per_image"], rep["flops_per_image"]
  row["sops_over_flops"] = rep["sops_per_image"] / rep["flops_per_image"]
  row["energy_mj_per_image"], row["ann_energy_mj_per_image"] = rep["energy_mj_per_image"], rep["ann_energy_mj_per_image"]
  row["mean_firing_rate"] = rep["mean_firing_rate"]
  return row


def evaluator_rate(name: str, batch: int, T: int, K: int, image_size: int | None, records: int, **arch) -> float:
  """Images/s of `evaluators.evaluate` (both modes) over `records` JPEG records, after a first
  pass that compiles and warms up."""
  cfg = bench_lib.train_config(name, batch, image_size, T=T, K=K, **arch)
  with tempfile.TemporaryDirectory() as tmp:
    side = cfg.data.image_size
    jpeg_records.build(tmp, train=1, validation=records, size_range=(side * 8 // 7, side * 3 // 2))
    with cfg.unlocked():
      cfg.data.update(name=jpeg_records.NAME, data_dir=tmp, test_split="validation", eval_policy="imagenet",
                      norm="imagenet", decode_in_workers=True)
    cfg.eval_batch_size = batch
    setup = train_state.create_train_state(cfg, shd.make_mesh(1))
    step = evaluators.make_eval_step(cfg, setup)
    evaluators.evaluate(cfg, setup, setup.state, step)
    t = time.perf_counter()
    out = evaluators.evaluate(cfg, setup, setup.state, step)
    dt = time.perf_counter() - t
  assert out["examples"] == records
  return records / dt


def main(argv=None):
  p = bench_lib.add_arch_options(bench_lib.arg_parser(__doc__))
  p.add_argument("--models", default="ge2mst_tiny,ge2mst_small")
  p.add_argument("--batch", default="64,8", help="one batch size per model")
  p.add_argument("--T", type=int, default=4)
  p.add_argument("--K", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--eval_records", type=int, default=64, help="JPEG records the evaluator row evaluates")
  a = p.parse_args(argv)
  names, batches = a.models.split(","), [int(b) for b in a.batch.split(",")]
  size = None
  if a.smoke:
    names, batches, a.steps, size, a.eval_records = ["ge2mst_tiny"], [4], 1, 16, 8
  arch = bench_lib.arch_overrides(a)
  rows = [bench(n, b, a.T, a.K, a.steps, size, **arch) for n, b in zip(names, batches + batches[-1:] * len(names))]
  for r in rows:
    r["evaluator_images_per_s"] = evaluator_rate(r["model"], r["batch"], a.T, a.K, size, a.eval_records, **arch)
    # both forwards of one image, as the evaluator runs them (the timed forwards above)
    r["forwards_images_per_s"] = r["batch"] / (r["quantize_s"] + r["spike_s"])
    r["evaluator_over_forwards"] = r["forwards_images_per_s"] / r["evaluator_images_per_s"]
  bench_lib.print_table(rows, [("model", "model", "s"), ("size", "image_size", "d"), ("batch", "batch", "d"),
                               ("quant img/s", "quantize_images_per_s", ".1f"),
                               ("spike img/s", "spike_images_per_s", ".1f"), ("spike/quant", "spike_over_quantize", ".2f"),
                               ("code img/s", "spike_code_images_per_s", ".1f"),
                               ("code/quant", "spike_code_over_quantize", ".2f"),
                               ("SOPs/img", "sops_per_image", ".4g"), ("FLOPs/img", "flops_per_image", ".4g"),
                               ("SOP/FLOP", "sops_over_flops", ".3f"),
                               ("eval img/s", "evaluator_images_per_s", ".1f"),
                               ("q+s img/s", "forwards_images_per_s", ".1f")])
  print(f"wrote {bench_lib.record('inference', rows, a.smoke, a.out)}")


if __name__ == "__main__":
  main()
