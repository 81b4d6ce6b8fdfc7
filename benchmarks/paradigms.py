"""The paper's Table 1, measured: ExpG-IF (quantizer) training against STBP (multi-step LIF,
backpropagation through time) on the same network, for T in {1, 2, 4, 8}.

  python benchmarks/paradigms.py                                  # ge2mst_tiny @32, batch 32
  python benchmarks/paradigms.py --model ge2mst_small --image_size 224 --batch 8 --Ts 1,4
  python benchmarks/paradigms.py --smoke                          # used by the tests

For each (paradigm, T): the median train-step time (every configuration is compiled first,
then all are timed in turn, round after round, one untimed and two timed steps each, so that
the machine's drift does not bias the ratios), the compiled step's memory from XLA's memory
analysis (deterministic: arguments + outputs + temporaries - donated aliases, and the
temporaries alone, which hold the activations kept for the backward pass), and the SOPs per
image of the spiking network each paradigm runs at inference, counted from the spikes of the
same synthetic images after the timing steps. ExpG-IF uses K = min(2, T).
"""

import bench_lib

from ge2mst_jax.evaluate import energy


def build(paradigm: str, T: int, a) -> tuple:
  arch = dict(T=T, K=min(2, T), paradigm=paradigm, **bench_lib.arch_overrides(a))
  return arch, bench_lib.TrainStep(bench_lib.train_config(a.model, a.batch, a.image_size, **arch))


def describe(paradigm: str, T: int, arch: dict, ts, dt: float, a) -> dict:
  cfg = ts.cfg
  images = bench_lib.synthetic_batch(a.sop_images, cfg.data.image_size, 10, seed=1)["image"]
  rep = energy.energy_report(ts.model(), images)
  mem = ts.memory()
  return {"paradigm": paradigm, "T": T, "K": arch["K"] if paradigm == "expg" else None, "model": a.model,
          "depths": list(cfg.model.arch.depths),
          "image_size": cfg.data.image_size, "batch": a.batch, "step_s": dt, "images_per_s": a.batch / dt,
          **mem, "peak_mib": mem["peak_bytes"] / 2 ** 20, "temp_mib": mem["temp_bytes"] / 2 ** 20, "compile_s": ts.compile_s,
          "sops_per_image": rep["sops_per_image"], "msops_per_image": rep["sops_per_image"] / 1e6,
          "mean_firing_rate": rep["mean_firing_rate"]}


def main(argv=None):
  p = bench_lib.add_arch_options(bench_lib.arg_parser(__doc__))
  p.add_argument("--model", default="ge2mst_tiny")
  p.add_argument("--image_size", type=int, default=None, help="default: the model's own")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--Ts", default="1,2,4,8")
  p.add_argument("--paradigms", default="expg,stbp")
  p.add_argument("--steps", type=int, default=5, help="timing rounds (every configuration 1 + 2 steps a round)")
  p.add_argument("--sop_images", type=int, default=16)
  a = p.parse_args(argv)
  Ts = [int(t) for t in a.Ts.split(",")]
  if a.smoke:
    a.image_size, a.batch, a.steps, a.sop_images, Ts = 16, 4, 1, 2, [4]  # T=4: train_step.py's smoke step
  configs = [(par, T) for par in a.paradigms.split(",") for T in Ts]
  built = [build(par, T, a) for par, T in configs]
  # Every configuration is compiled first and then timed in turn, round after round.
  times = bench_lib.interleaved_medians([ts.step_once for _, ts in built], a.steps)
  rows = [describe(par, T, arch, ts, dt, a) for (par, T), (arch, ts), dt in zip(configs, built, times)]
  for r in rows:  # growth against the same paradigm at the smallest T
    base = next(b for b in rows if b["paradigm"] == r["paradigm"] and b["T"] == Ts[0])
    r["time_vs_T1"], r["memory_vs_T1"] = r["step_s"] / base["step_s"], r["peak_bytes"] / base["peak_bytes"]
  bench_lib.print_table(rows, [("paradigm", "paradigm", "s"), ("T", "T", "d"), ("step s", "step_s", ".4f"),
                               ("img/s", "images_per_s", ".1f"), ("time/T1", "time_vs_T1", ".2f"),
                               ("peak MiB", "peak_mib", ".1f"), ("temp MiB", "temp_mib", ".1f"),
                               ("mem/T1", "memory_vs_T1", ".2f"), ("M SOPs/img", "msops_per_image", ".3f"),
                               ("fire rate", "mean_firing_rate", ".4f")])
  print(f"wrote {bench_lib.record('paradigms', rows, a.smoke, a.out)}")


if __name__ == "__main__":
  main()
