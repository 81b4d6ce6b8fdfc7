"""One command that measures the project on whatever device JAX finds: a GPU, a TPU, or the CPU.

  python benchmarks/device_check.py --out benchmarks/results          # default budget: 480 s
  python benchmarks/device_check.py --out /tmp/check --budget_s 900
  python benchmarks/device_check.py --smoke --out /tmp/check          # every part, tiny, on the CPU (< 2 min)
  JAX_PLATFORMS=cpu python benchmarks/device_check.py --write_reference   # part 6's CPU loss curves

The parts, cheapest first, so that a short budget still says whether the device computes the
right network:
  environment  device kind and count, device memory, jax/jaxlib/libtpu/CUDA versions, commit;
  agreement    spike mode == quantize mode on random eval-mode networks (float32, bfloat16) at the
               device's default matmul precision and at 'highest';
  digits       a short ge2mst_tiny digits training run: its loss curve against the CPU reference
               stored in benchmarks/results (`REFERENCE`);
  train_step   ge2mst_small @224² bf16 on configs/imagenet2012's recipe at the largest batch of
               `BATCHES` that fits: images/s, step-time spread, compile time, peak device memory,
               FLOPs per image from the compiled program's cost analysis, MFU (`PEAKS`);
  variants     the same step with remat='block', and on a TPU with attention_kernel='xla' against
               the Pallas kernel (the TPU default);
  eval         evaluation throughput, quantize and spike mode (`steps` and `code` integration).

The budget (`--budget_s`, compile time included) is checked before every part and every batch-size
try, against an estimate from what the parts before it measured; what would not fit is skipped
with a note saying so. The JSON (and its Markdown summary) is rewritten after every part, so a run
stopped from outside leaves every finished part on disk. Results are named by device
(`result_name`): runs on different machines sit side by side in one directory, and
`device_check.md` there sets them in one table.
"""
import gc
import glob
import importlib.metadata
import json
import math
import os
import re
import time
import traceback

import bench_lib
import inference
import train_step
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import digits as digits_recipe, imagenet2012
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.nn import blocks, models
from ge2mst_jax.train import loop as train_lib, sharding as shd, state as train_state

REFERENCE = os.path.join(bench_lib.RESULTS, "device_check_reference_digits.json")
PARTS = ("environment", "agreement", "digits", "train_step", "variants", "eval")

# Dense peak FLOP/s per chip from the vendors' datasheets (sparsity excluded), matched against
# `device_kind` in order (the first pattern that matches). GPU float32 is the CUDA cores' rate;
# 'tf32' is the tensor cores' rate for float32 matmuls at JAX's default precision on GPUs. TPUs
# publish bf16 only: their MXUs compute float32 matmuls as bf16 passes (one at the default
# precision, several at 'highest'), so float32 has no peak of its own and no MFU.
_NVIDIA = "https://www.nvidia.com/en-us/data-center/"
PEAKS = (
    (r"h100.*pcie", "NVIDIA H100 PCIe", 756.5e12, 378e12, 51.2e12, _NVIDIA + "h100/ (datasheet)"),
    (r"h100.*nvl", "NVIDIA H100 NVL", 835.5e12, 417.5e12, 60e12, _NVIDIA + "h100/ (datasheet)"),
    (r"h100", "NVIDIA H100 SXM", 989.4e12, 494.7e12, 66.9e12, _NVIDIA + "h100/ (datasheet)"),
    (r"h200.*nvl", "NVIDIA H200 NVL", 835.5e12, 417.5e12, 60e12, _NVIDIA + "h200/ (datasheet)"),
    (r"h200", "NVIDIA H200 SXM", 989.4e12, 494.7e12, 66.9e12, _NVIDIA + "h200/ (datasheet)"),
    (r"a100", "NVIDIA A100 (SXM or PCIe)", 312e12, 156e12, 19.5e12, _NVIDIA + "a100/ (datasheet)"),
    (r"tpu v4", "TPU v4", 275e12, None, None, "https://cloud.google.com/tpu/docs/v4"),
    (r"tpu v5 ?lite|tpu v5e", "TPU v5e", 197e12, None, None, "https://cloud.google.com/tpu/docs/v5e"),
    (r"tpu v5p|tpu v5$", "TPU v5p", 459e12, None, None, "https://cloud.google.com/tpu/docs/v5p"),
    (r"tpu v6 ?lite|tpu v6e", "TPU v6e", 918e12, None, None, "https://cloud.google.com/tpu/docs/v6e"),
)

# The train step's batch sizes per device, largest first: the largest that fits is measured.
BATCHES = (1024, 512, 256, 128, 64)
SIZES = {  # the full check, and --smoke's tiny versions of the same parts
    False: dict(model="ge2mst_small", image_size=None, depths=None, batches=BATCHES, steps=10, eval_batch=256,
                eval_rounds=3, agree_image_size=16, agree_images=64, agree_seeds=3, digits="full"),
    True: dict(model="ge2mst_tiny", image_size=16, depths=bench_lib.SMOKE_DEPTHS, batches=(8, 4), steps=2,
               eval_batch=4, eval_rounds=1, agree_image_size=16, agree_images=8, agree_seeds=1, digits="smoke"),
}
# Part 6's runs: the digits config (ge2mst_tiny @32², batch 64, T=4), and --smoke's smaller
# network. Both are stored in REFERENCE by --write_reference on a CPU.
DIGITS_RUNS = {
    "full": dict(steps=40, arch={}),
    "smoke": dict(steps=4, arch=dict(image_size=16, widths=(8, 16, 16, 32), heads=(1, 1, 1), stem_width=8,
                                      depths=(1, 1, 0, 0))),
}
# How close the device's losses must be to the CPU's (see docs/device-check.md). The first loss is
# one forward pass of the same parameters on the same batch: float32 rounding only. After that the
# two runs are two trajectories of a quantized network: a last-bit difference in a sum can move an
# activation across a level, and the per-step losses drift apart by a few percent (up to 7 % in the
# reference's own run with the accelerators' kernels, see `write_reference`) while following one
# curve. The curve is therefore compared as means over windows of `CURVE_WINDOW` steps; the full
# run's loss falls by ~14 % between its first and last windows, so a device that does not train the
# same network lands well outside `CURVE_RTOL`.
FIRST_LOSS_RTOL = 1e-4
CURVE_WINDOW = 10
CURVE_RTOL = 0.05


class Budget:
  """Seconds left of the run's budget, and what each part's estimate says about starting it."""

  def __init__(self, seconds: float):
    self.seconds, self.start = seconds, time.monotonic()

  def left(self) -> float:
    return self.seconds - (time.monotonic() - self.start)

  def skip_note(self, need_s: float, what: str) -> str | None:
    """None when `what` (estimated at `need_s` seconds) fits in what is left, else why it is skipped."""
    left = self.left()
    return None if need_s <= left else f"{what} skipped: needs ~{need_s:.0f} s, {max(left, 0):.0f} s of the budget left"


class Skipped(Exception):
  """A part (or the rest of it) that the budget leaves no time for; the message says why."""


def result_name(header: dict) -> str:
  """`device_check_<platform>_<device kind>_x<count>[_smoke]`: one file per kind of machine."""
  kind = re.sub(r"[^a-z0-9]+", "-", header["device_kind"].lower()).strip("-")
  return f"device_check_{header['platform']}_{kind}_x{header['device_count']}" + ("_smoke" if header["smoke"] else "")


def peak_of(device_kind: str) -> dict | None:
  for pattern, name, bf16, tf32, f32, source in PEAKS:
    if re.search(pattern, device_kind.lower()):
      return {"name": name, "bfloat16": bf16, "tf32": tf32, "float32": f32, "source": source}
  return None


def is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def memory_stats() -> dict | None:
  return jax.devices()[0].memory_stats()


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


# ----------------------------------------------------------------------------
# The parts


def part_environment(check) -> dict:
  import jaxlib
  dev = jax.devices()[0]
  stats = memory_stats()
  cuda = {p: v for p in ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                         "nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu12", "nvidia-cuda-runtime", "nvidia-cudnn-cu13")
          if (v := _version(p))}
  return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
          "memory_bytes_limit": stats.get("bytes_limit") if stats else None,
          "memory_stats_note": None if stats else f"memory_stats() is None on {dev.platform}: no device memory figures",
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "libtpu": _version("libtpu") or _version("libtpu-nightly"),
          "cuda_packages": cuda, "backend_version": dev.client.platform_version,
          "peak_flops": peak_of(dev.device_kind)}


def _calibrated(model, images, steps: int = 12):
  """Random weights with BatchNorm statistics from a few train-mode passes: a well-conditioned net."""
  model.train()
  forward = nnx.jit(lambda m, x: m(x, mode="quantize"))
  for _ in range(steps):
    forward(model, images)
  model.eval()
  return model


def part_agreement(check) -> dict:
  """Prediction agreement and relative logit differences of spike and quantize mode, per dtype and
  precision, on `agree_seeds` random ge2mst_tiny networks x `agree_images` images. The pass
  thresholds are tests/test_models.py's (agreement >= 99 %, median relative difference < 1e-5), and
  so is the full check's setup (16² images, 3 seeds x 64): at 32² a random network's logits have
  more near-ties, and one or two argmax flips in 192 images already miss 99 %."""
  s = check.sizes
  both = nnx.jit(lambda m, x: (m(x, mode="quantize"), m(x, mode="spike")))
  distinct = blocks.float32_matmul_follows_precision()
  rows = []
  for dtype in ("float32", "bfloat16"):
    for precision in ("default", "highest"):
      if precision == "highest" and not distinct:
        rows.append({**rows[-1], "precision": precision, "same_as": "default",
                     "note": "float32 matmuls ignore the precision setting on this backend: one result serves both"})
        continue
      t = time.perf_counter()
      agree, rel = [], []
      for seed in range(s["agree_seeds"]):
        arch = {"depths": tuple(int(d) for d in s["depths"].split(","))} if s["depths"] else {}
        model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(seed), dtype=dtype, image_size=s["agree_image_size"],
                                    **arch)
        x = jax.random.normal(jax.random.key(100 + seed), (s["agree_images"], s["agree_image_size"],
                                                          s["agree_image_size"], 3))
        _calibrated(model, x)
        with jax.default_matmul_precision(None if precision == "default" else precision):
          yq, ys = (np.asarray(y) for y in both(model, x))
        agree.append(np.argmax(yq, -1) == np.argmax(ys, -1))
        rel.append(np.max(np.abs(yq - ys), -1) / np.max(np.abs(yq)))
      agree, rel = np.concatenate(agree), np.concatenate(rel)
      row = {"dtype": dtype, "precision": precision, "images": int(agree.size),
             "prediction_agreement": float(agree.mean()), "median_rel_logit_diff": float(np.median(rel)),
             "max_rel_logit_diff": float(rel.max()), "seconds": time.perf_counter() - t}
      row["passed"] = bool(row["prediction_agreement"] >= 0.99 and row["median_rel_logit_diff"] < 1e-5)
      rows.append(row)
  return {"model": "ge2mst_tiny", "image_size": s["agree_image_size"], "depths": s["depths"],
          "float32_matmul_follows_precision": distinct, "rows": rows, "passed": all(r["passed"] for r in rows)}


def digits_config(run: str):
  """Part 6's training config: configs/digits.py (ge2mst_tiny @32², batch 64) with `DIGITS_RUNS[run]`."""
  spec = DIGITS_RUNS[run]
  cfg = digits_recipe.get_config(f"steps={spec['steps']}")
  cfg.data.workers = 0   # the stream is the same in-process (data_lib.train_dataset), and starts at once
  for k, v in spec["arch"].items():
    cfg.model.arch[k] = v   # image_size is one FieldReference with cfg.data's
  return cfg


def digits_losses(cfg, **arch) -> tuple[list[float], dict]:
  """The per-step losses of `cfg.total_steps` training steps on one device, every matmul at
  'highest' precision (float32 as the CPU computes it; a GPU's default would be TF32)."""
  with cfg.unlocked():
    for k, v in arch.items():
      cfg.model.arch[k] = v
  mesh = shd.make_mesh(1, jax.devices()[:1])
  setup = train_state.create_train_state(cfg, mesh)
  step = train_lib.make_train_step(cfg, setup)
  it = iter(data_lib.train_dataset(cfg.data, cfg.batch_size, cfg.seed))
  batches = [shd.global_batch(next(it), mesh) for _ in range(cfg.total_steps)]
  state, losses = setup.state, []
  with jax.default_matmul_precision("highest"):
    t = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches:
      state, m = compiled(state, b)
      losses.append(float(m["loss"]))
  return losses, {"compile_s": compile_s, "run_s": time.perf_counter() - t}


def compare_curves(device: list[float], reference: list[float]) -> dict:
  """The first losses' relative difference, and the window means' (`CURVE_WINDOW` steps each)."""
  device, reference = np.asarray(device), np.asarray(reference[:len(device)])
  means = lambda x: np.array([x[i:i + CURVE_WINDOW].mean() for i in range(0, len(x), CURVE_WINDOW)])
  first = float(abs(device[0] - reference[0]) / reference[0])
  windows = np.abs(means(device) - means(reference)) / means(reference)
  return {"first_loss_rel_diff": first, "window_mean_rel_diffs": windows.tolist(),
          "max_window_rel_diff": float(windows.max()),
          "max_step_rel_diff": float(np.max(np.abs(device - reference) / reference)),
          "first_loss_rtol": FIRST_LOSS_RTOL, "curve_window": CURVE_WINDOW, "curve_rtol": CURVE_RTOL,
          "passed": bool(first <= FIRST_LOSS_RTOL and windows.max() <= CURVE_RTOL)}


def part_digits(check) -> dict:
  run = check.sizes["digits"]
  if not os.path.exists(REFERENCE):
    raise FileNotFoundError(f"{REFERENCE} is missing: make it on a CPU with "
                            f"JAX_PLATFORMS=cpu python benchmarks/device_check.py --write_reference")
  with open(REFERENCE) as f:
    reference = json.load(f)
  ref = reference["runs"][run]
  # One small train step to compile: about half of what the agreement part's forward passes took.
  need = 0.5 * check.result["parts"].get("agreement", {}).get("seconds", 0)
  if note := check.budget.skip_note(need, "the digits run"):
    raise Skipped(note)
  losses, times = digits_losses(digits_config(run))
  check.estimates["tiny_compile_s"] = times["compile_s"]
  return {"run": run, "steps": len(losses), "losses": losses, "reference_losses": ref["losses"],
          "reference": {k: reference[k] for k in ("date", "machine", "device_kind", "jax", "commit")},
          **compare_curves(losses, ref["losses"]), **times}


def train_config(check, batch: int, **arch):
  """configs/imagenet2012.py's recipe (AdamW, mixup/CutMix, label smoothing, bf16) for the check's
  model on synthetic images of the check's size."""
  s = check.sizes
  cfg = imagenet2012.get_config(f"{s['model'].removeprefix('ge2mst_')},batch={batch}")
  with cfg.unlocked():
    cfg.data.name = "synthetic"
    if s["image_size"]:
      cfg.data.image_size = s["image_size"]
    if s["depths"]:
      cfg.model.arch.depths = tuple(int(d) for d in s["depths"].split(","))
    for k, v in arch.items():
      cfg.model.arch[k] = v
  return cfg


def measure_step(check, cfg) -> dict:
  """train_step.py's row of `cfg`'s step, with the step-time spread, the compiled program's FLOPs
  per image (cost analysis), MFU and the device's memory high-water mark."""
  ts = bench_lib.TrainStep(cfg)
  try:
    # One probe step (it also warms up), then as many of `steps` as the budget has time for.
    probe = ts.step_once()
    steps = max(2, min(check.sizes["steps"], int(check.budget.left() / probe) - 1))
    row = train_step.bench_step(ts, steps)
  finally:
    compiled = ts.compiled
    del ts
  times = np.asarray(row.pop("step_times_s"))
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca   # older JAX: one dict per program
  flops = float(ca["flops"]) if ca and "flops" in ca else None
  row |= {"step_s_min": float(times.min()), "step_s_max": float(times.max()),
          "step_s_p10": float(np.percentile(times, 10)), "step_s_p90": float(np.percentile(times, 90)),
          "step_spread": float((np.percentile(times, 90) - np.percentile(times, 10)) / row["step_s"]),
          "steps_timed": steps, "cost_analysis_flops_per_image": flops / cfg.batch_size if flops else None,
          "remat": cfg.model.arch.remat, "attention_kernel": models.arch_from_config(cfg).compute.attention}
  peak = peak_of(jax.devices()[0].device_kind)
  rate = peak and peak.get(row["dtype"])
  row["mfu"] = flops / row["step_s"] / rate if flops and rate else None
  row["mfu_model_flops"] = row["model_flops_per_s"] / rate if rate else None
  row["mfu_peak_flops"] = rate
  if not rate:
    row["mfu_note"] = (f"no {row['dtype']} peak FLOP/s for device kind {jax.devices()[0].device_kind!r} "
                       f"in device_check.PEAKS: MFU is null")
  stats = memory_stats()
  row["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use") if stats else None
  row["device_bytes_limit"] = stats.get("bytes_limit") if stats else None
  if not stats:
    row["device_memory_note"] = (f"memory_stats() is None on {jax.default_backend()}: no device peak memory; "
                                 f"peak_bytes is the compiled program's own (XLA's memory analysis)")
  check.estimates["train_compile_s"] = row["trace_s"] + row["compile_s"]
  check.estimates["train_step_s"] = row["step_s"]
  return row


def _free():
  gc.collect()
  jax.clear_caches()


def part_train_step(check) -> dict:
  """The largest batch of `batches` that fits: a first compile at the smallest gives the step's
  memory per image (XLA's memory analysis); larger batches start where that estimate fits the
  device's memory, and each try that runs out of memory steps down to the next."""
  s = check.sizes
  stats = memory_stats()
  limit = stats.get("bytes_limit") if stats else None
  tries, candidates = [], list(s["batches"])
  if limit is None:   # no device memory to fill (the CPU): the smallest batch, the cheapest step
    candidates = candidates[-1:]
  else:
    smallest = min(candidates)
    need = check.estimates.get("tiny_compile_s", 0) * 2
    if note := check.budget.skip_note(need, f"the batch-{smallest} step's memory estimate"):
      raise Skipped(note)
    t = time.perf_counter()
    ts = bench_lib.TrainStep(train_config(check, smallest))
    mem = ts.memory()
    del ts
    _free()
    check.estimates["train_compile_s"] = time.perf_counter() - t
    fixed = mem["peak_bytes"] - mem["temp_bytes"]
    estimate = lambda b: fixed + mem["temp_bytes"] * b / smallest
    fits = [b for b in candidates if estimate(b) <= 0.9 * limit]
    tries.append({"batch": smallest, "compiled_peak_bytes": mem["peak_bytes"],
                  "note": "compiled for the memory estimate of larger batches"})
    candidates = [b for b in candidates if b in fits] or [smallest]
  for batch in candidates:
    need = check.estimates.get("train_compile_s", 2 * check.estimates.get("tiny_compile_s", 0)) + \
        (s["steps"] + 1) * check.estimates.get("train_step_s", 0) * batch / min(candidates)
    if note := check.budget.skip_note(need, f"batch {batch}"):
      tries.append({"batch": batch, "note": note})
      continue
    try:
      row = measure_step(check, train_config(check, batch))
      tries.append({"batch": batch, "fits": True})
      return {"row": row, "tries": tries}
    except Exception as e:   # noqa: BLE001: only the device's out-of-memory error is a try that failed
      if not is_oom(e):
        raise
      tries.append({"batch": batch, "fits": False, "error": str(e).splitlines()[0][:300]})
      _free()
  raise Skipped("no batch size was measured: " + "; ".join(t.get("note") or t.get("error", "") for t in tries))


def part_variants(check) -> dict:
  """remat 'block' (and on a TPU attention_kernel 'xla', beside part 2's Pallas kernel) at part 2's batch."""
  base = check.result["parts"].get("train_step", {}).get("row")
  if not base:
    raise Skipped("needs part train_step's batch size, which was not measured")
  variants = {"remat_block": {"remat": "block"}}
  notes = []
  if jax.default_backend() == "tpu":
    variants["attention_xla"] = {"attention_kernel": "xla"}
  else:
    notes.append(f"attention_kernel 'pallas' vs 'xla' skipped: the Pallas kernel is TPU-only "
                 f"(this backend: {jax.default_backend()}); the train step used 'xla'")
  rows = {}
  for name, arch in variants.items():
    need = check.estimates["train_compile_s"] + (check.sizes["steps"] + 1) * check.estimates["train_step_s"] * 1.5
    if note := check.budget.skip_note(need, name):
      notes.append(note)
      continue
    _free()
    try:
      row = measure_step(check, train_config(check, base["batch"], **arch))
    except Exception as e:   # noqa: BLE001
      if not is_oom(e):
        raise
      notes.append(f"{name} ran out of device memory at batch {base['batch']}")
      continue
    row["images_per_s_vs_train_step"] = row["images_per_s"] / base["images_per_s"]
    rows[name] = row
  return {"rows": rows, "notes": notes}


def part_eval(check) -> dict:
  """inference.py's row: quantize mode, spike mode ('steps') and spike mode ('code') timed in turn
  on the check's network in bf16, with SOPs and FLOPs per image; the batch halves on out-of-memory."""
  s = check.sizes
  cfg = train_config(check, s["eval_batch"])
  arch = {k: cfg.model.arch[k] for k in ("dtype", "depths")}
  batch = s["eval_batch"]
  need = 2 * check.estimates.get("train_compile_s", 0)
  if note := check.budget.skip_note(need, "evaluation throughput"):
    raise Skipped(note)
  _free()
  while True:
    try:
      return inference.bench(s["model"], batch, cfg.model.arch.T, cfg.model.arch.K, s["eval_rounds"],
                             s["image_size"], **arch)
    except Exception as e:   # noqa: BLE001
      if not is_oom(e) or batch == 1:
        raise
      batch //= 2
      _free()


PART_FUNCTIONS = {"environment": part_environment, "agreement": part_agreement, "digits": part_digits,
                  "train_step": part_train_step, "variants": part_variants, "eval": part_eval}


# ----------------------------------------------------------------------------
# The run, its files and the Markdown


class Check:
  def __init__(self, smoke: bool, budget_s: float, out: str):
    self.sizes, self.budget, self.out = SIZES[smoke], Budget(budget_s), out
    self.estimates = {}
    self.result = {**bench_lib.header("device_check", smoke), "budget_s": budget_s, "parts": {}}
    self.name = result_name(self.result)

  def run(self, parts=PARTS) -> dict:
    for name in parts:
      t = time.perf_counter()
      print(f"[{self.budget.seconds - self.budget.left():6.1f} s] {name} ...", flush=True)
      if self.budget.left() <= 0:
        part = {"status": "skipped", "note": f"{name} skipped: the budget of {self.budget.seconds:.0f} s is spent"}
      else:
        try:
          part = {"status": "ok", **PART_FUNCTIONS[name](self)}
        except Skipped as e:
          part = {"status": "skipped", "note": str(e)}
        except Exception as e:   # noqa: BLE001: one part's failure is recorded; the others still run
          part = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()}
          print(part["traceback"], flush=True)
      part["seconds"] = time.perf_counter() - t
      self.result["parts"][name] = part
      self.result["elapsed_s"] = self.budget.seconds - self.budget.left()
      self.write()
      print(f"  {part['status']}" + (f": {part.get('note') or part.get('error')}" if part["status"] != "ok" else ""),
            flush=True)
    return self.result

  def write(self) -> None:
    os.makedirs(self.out, exist_ok=True)
    base = os.path.join(self.out, self.name)
    for path, text in ((base + ".json", json.dumps(self.result, indent=2, default=float)),
                       (base + ".md", summary(self.result)),
                       (os.path.join(self.out, "device_check" + ("_smoke" if self.result["smoke"] else "") + ".md"),
                        side_by_side(self.out, self.result["smoke"]))):
      with open(path + ".tmp", "w") as f:   # whole files only: a reader never sees half of one
        f.write(text)
      os.replace(path + ".tmp", path)


def _fmt(v, fmt: str) -> str:
  return "-" if v is None else format(v, fmt)


def figures(result: dict) -> list[tuple[str, str]]:
  """(label, value) of one run's headline figures, for the summary and the side-by-side table."""
  p = result["parts"]
  env, tr = p.get("environment", {}), p.get("train_step", {}).get("row") or {}
  var, ev = p.get("variants", {}).get("rows", {}), p.get("eval", {})
  ag, dg = p.get("agreement", {}), p.get("digits", {})
  gib = lambda b: _fmt(b / 2 ** 30 if b else None, ".1f")
  rows = [("date", result["date"]), ("commit", (result.get("commit") or "-")[:12]),
          ("device", f"{result['device_kind']} x{result['device_count']}"),
          ("device memory (GiB)", gib(env.get("memory_bytes_limit"))),
          ("jax / jaxlib", f"{env.get('jax', result['jax'])} / {env.get('jaxlib', '-')}"),
          ("train: model, image size, dtype", f"{tr.get('model', '-')} @{tr.get('image_size', '-')} {tr.get('dtype', '-')}"),
          ("train: batch", _fmt(tr.get("batch"), "d")),
          ("train: images/s", _fmt(tr.get("images_per_s"), ".1f")),
          ("train: step ms, median (p10-p90)", "-" if not tr else
           f"{tr['step_s'] * 1e3:.1f} ({tr['step_s_p10'] * 1e3:.1f}-{tr['step_s_p90'] * 1e3:.1f})"),
          ("train: compile s", _fmt(tr.get("compile_s"), ".1f")),
          ("train: device peak memory (GiB)", gib(tr.get("device_peak_bytes_in_use"))),
          ("train: compiled peak memory (GiB)", gib(tr.get("peak_bytes"))),
          ("train: GFLOPs/image (cost analysis)", _fmt((tr.get("cost_analysis_flops_per_image") or 0) / 1e9 or None, ".2f")),
          ("train: MFU", _fmt(tr.get("mfu"), ".1%")),
          ("train, remat 'block': images/s", _fmt(var.get("remat_block", {}).get("images_per_s"), ".1f")),
          ("train, attention 'xla' (TPU): images/s", _fmt(var.get("attention_xla", {}).get("images_per_s"), ".1f")),
          ("eval quantize: images/s", _fmt(ev.get("quantize_images_per_s"), ".1f")),
          ("eval spike 'steps': images/s", _fmt(ev.get("spike_images_per_s"), ".1f")),
          ("eval spike 'code': images/s", _fmt(ev.get("spike_code_images_per_s"), ".1f"))]
  for r in ag.get("rows", []):
    rows.append((f"spike = quantize, {r['dtype']} @{r['precision']}: agreement",
                 f"{r['prediction_agreement']:.2%}" + ("" if r.get("passed", True) else " (FAILED)")))
  if "max_window_rel_diff" in dg:
    rows.append((f"digits loss curve vs CPU: max diff of {CURVE_WINDOW}-step means",
                 f"{dg['max_window_rel_diff']:.2%}" + (" (passed)" if dg["passed"] else " (FAILED)")))
  return rows


def summary(result: dict) -> str:
  lines = [f"# Device check: {result['device_kind']} x{result['device_count']}", "",
           f"{result['date']}, machine `{result['machine']}`, commit `{result.get('commit')}`, "
           f"budget {result['budget_s']:.0f} s, elapsed {result.get('elapsed_s', 0):.0f} s"
           + (" (smoke: tiny sizes)" if result["smoke"] else ""), "",
           "| figure | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in figures(result)]
  lines += ["", "| part | status | seconds | note |", "|---|---|---|---|"]
  for name, part in result["parts"].items():
    notes = [part.get("note"), part.get("error"), *part.get("notes", [])]
    note = "; ".join(n.splitlines()[0] for n in notes if n).replace("|", "/")
    lines.append(f"| {name} | {part['status']} | {part['seconds']:.1f} | {note} |")
  return "\n".join(lines) + "\n"


def side_by_side(out: str, smoke: bool) -> str:
  """Every device's latest check in `out`, one column each."""
  results = []
  for path in sorted(glob.glob(os.path.join(out, "device_check_*.json"))):
    if path.endswith("_smoke.json") != smoke or path == REFERENCE or "reference" in os.path.basename(path):
      continue
    with open(path) as f:
      results.append(json.load(f))
  if not results:
    return ""
  cols = [dict(figures(r)) for r in results]
  head = [f"{r['device_kind']} x{r['device_count']}" for r in results]
  lines = ["# Device checks side by side (`python benchmarks/device_check.py`)", "",
           "| figure | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
  labels = [k for k, _ in figures(results[0])] + [k for c in cols for k in c if k not in dict(figures(results[0]))]
  for label in dict.fromkeys(labels):
    lines.append(f"| {label} | " + " | ".join(c.get(label, "-") for c in cols) + " |")
  return "\n".join(lines) + "\n"


def write_reference(out: str) -> str:
  """Part 6's CPU loss curves (both runs), and the spread across the accelerators' kernel choices
  that the tolerance is set against."""
  if jax.default_backend() != "cpu":
    raise SystemExit("error: --write_reference records the CPU's loss curves: run it with JAX_PLATFORMS=cpu.")
  result = {**bench_lib.header("device_check_reference_digits", False), "runs": {}}
  for run in DIGITS_RUNS:
    losses, times = digits_losses(digits_config(run))
    # The kernels a GPU or TPU picks (`blocks.Numerics`: 'auto' resolves per backend), computed here.
    other, _ = digits_losses(digits_config(run), depthwise="conv", conv_kernel_grad="conv")
    result["runs"][run] = {"config": DIGITS_RUNS[run], "losses": losses, **times,
                           "accelerator_kernels_losses": other, **{f"accelerator_kernels_{k}": v for k, v in
                                                                   compare_curves(other, losses).items()}}
    print(f"{run}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; accelerator kernels on the CPU: "
          f"{CURVE_WINDOW}-step means within {result['runs'][run]['accelerator_kernels_max_window_rel_diff']:.2%}")
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, os.path.basename(REFERENCE))
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return path


def main(argv=None) -> int:
  p = bench_lib.arg_parser(__doc__)
  p.add_argument("--budget_s", type=float, default=480, help="seconds for all parts, compile time included")
  p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
  p.add_argument("--write_reference", action="store_true",
                 help="(CPU) record part 6's reference loss curves in --out, then stop")
  a = p.parse_args(argv)
  if a.write_reference:
    print(f"wrote {write_reference(a.out)}")
    return 0
  parts = [x for x in a.parts.split(",") if x]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    p.error(f"--parts: unknown part(s) {unknown}: use some of {','.join(PARTS)}")
  check = Check(a.smoke, a.budget_s, a.out)
  result = check.run(parts)
  print(summary(result))
  print(f"wrote {os.path.join(a.out, check.name)}.json and .md")
  return 1 if any(part["status"] == "error" for part in result["parts"].values()) else 0


if __name__ == "__main__":
  raise SystemExit(main())
