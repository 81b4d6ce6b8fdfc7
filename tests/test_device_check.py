"""benchmarks/device_check.py: its smoke run writes every part's figures (JSON and Markdown), and its
budget, file naming, peak table and loss-curve comparison behave as documented (docs/device-check.md)."""
import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from tests import cpu
from tests.test_train import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
with mock.patch.dict(os.environ, {"GE2MST_HUGE_PAGES": "off"}):   # bench_lib would re-execute pytest
  import device_check  # noqa: E402

ENV_KEYS = {"platform", "device_kind", "device_count", "memory_bytes_limit", "memory_stats_note", "jax", "jaxlib",
            "libtpu", "cuda_packages", "backend_version", "peak_flops"}
TRAIN_KEYS = {"model", "image_size", "batch", "dtype", "images_per_s", "step_s", "step_s_p10", "step_s_p90",
              "step_spread", "compile_s", "peak_bytes", "device_peak_bytes_in_use", "cost_analysis_flops_per_image",
              "mfu", "remat", "attention_kernel", "steps_timed"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One `--smoke` run, as a user types it (one real CPU device)."""
  out = tmp_path_factory.mktemp("device_check")
  r = subprocess.run([sys.executable, "benchmarks/device_check.py", "--smoke", "--out", str(out)],
                     capture_output=True, text=True, timeout=600, cwd=ROOT, env=cpu.env(devices=1))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  name = "device_check_cpu_cpu_x1_smoke"
  return json.load(open(out / f"{name}.json")), (out / f"{name}.md").read_text(), out, r.stdout


@pytest.mark.slow
def test_smoke_run_writes_every_part(smoke):
  res, md, out, stdout = smoke
  assert res["benchmark"] == "device_check" and res["smoke"] is True and res["commit"]
  assert list(res["parts"]) == list(device_check.PARTS)
  assert {p["status"] for p in res["parts"].values()} == {"ok"}, {k: p.get("error") for k, p in res["parts"].items()}
  assert res["elapsed_s"] <= res["budget_s"]
  env = res["parts"]["environment"]
  assert ENV_KEYS <= set(env) and env["platform"] == "cpu" and env["peak_flops"] is None
  assert env["memory_bytes_limit"] is None and "memory_stats() is None" in env["memory_stats_note"]
  row = res["parts"]["train_step"]["row"]
  assert TRAIN_KEYS <= set(row) and row["model"] == "ge2mst_tiny" and row["dtype"] == "bfloat16"
  assert row["images_per_s"] > 0 and row["step_s_p10"] <= row["step_s"] <= row["step_s_p90"]
  # The compiled program's FLOPs: more than the forward MACs x 2 (the backward pass adds its own).
  assert row["cost_analysis_flops_per_image"] > 2 * row["macs_per_image"]
  assert row["mfu"] is None and "PEAKS" in row["mfu_note"]   # the CPU has no peak in the table
  assert row["device_peak_bytes_in_use"] is None and "memory_stats() is None" in row["device_memory_note"]
  var = res["parts"]["variants"]
  assert var["rows"]["remat_block"]["remat"] == "block" and "attention_xla" not in var["rows"]
  assert any("TPU-only" in n for n in var["notes"])
  ev = res["parts"]["eval"]
  assert all(ev[k] > 0 for k in ("quantize_images_per_s", "spike_images_per_s", "spike_code_images_per_s"))
  ag = res["parts"]["agreement"]
  assert [(r["dtype"], r["precision"]) for r in ag["rows"]] == [
      (d, p) for d in ("float32", "bfloat16") for p in ("default", "highest")]
  assert ag["passed"] and all(r["prediction_agreement"] >= 0.99 for r in ag["rows"])
  dg = res["parts"]["digits"]
  # The CPU against the CPU's own reference: the same program on the same batches.
  assert dg["passed"] and dg["first_loss_rel_diff"] < 1e-6 and len(dg["losses"]) == dg["steps"]
  for label in ("train: images/s", "train: MFU", "eval spike 'code': images/s", "digits loss curve vs CPU"):
    assert label in md
  assert "| variants | ok |" in md and "TPU-only" in md
  side = (out / "device_check_smoke.md").read_text()
  assert "| cpu x1 |" in side and "train: images/s" in side
  assert f"wrote {out / 'device_check_cpu_cpu_x1_smoke'}.json" in stdout


def test_spent_budget_skips_parts_with_a_note(tmp_path):
  check = device_check.Check(smoke=True, budget_s=0, out=str(tmp_path))
  res = check.run(["environment", "train_step"])
  assert all(p["status"] == "skipped" and "budget" in p["note"] for p in res["parts"].values())
  written = json.load(open(tmp_path / f"{check.name}.json"))
  assert set(written["parts"]) == {"environment", "train_step"}
  assert "| train_step | skipped |" in (tmp_path / f"{check.name}.md").read_text()


def test_budget_skip_note():
  budget = device_check.Budget(100)
  assert budget.skip_note(10, "x") is None
  assert budget.skip_note(1000, "batch 512").startswith("batch 512 skipped: needs ~1000 s")


@pytest.mark.parametrize("kind, name, bf16", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.4e12), ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.4e12), ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 (SXM or PCIe)", 312e12),
    ("TPU v4", "TPU v4", 275e12), ("TPU v5 lite", "TPU v5e", 197e12), ("TPU v5", "TPU v5p", 459e12),
    ("TPU v6 lite", "TPU v6e", 918e12)])
def test_peak_of_device_kinds(kind, name, bf16):
  peak = device_check.peak_of(kind)
  assert peak["name"] == name and peak["bfloat16"] == bf16 and peak["source"].startswith("https://")
  assert (peak["float32"] is None) == kind.startswith("TPU")


def test_peak_of_unknown_kind_is_none():
  assert device_check.peak_of("cpu") is None


def test_result_names_keep_machines_apart():
  head = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "device_count": 1, "smoke": False}
  assert device_check.result_name(head) == "device_check_gpu_nvidia-h100-80gb-hbm3_x1"
  assert device_check.result_name({**head, "platform": "tpu", "device_kind": "TPU v5 lite", "device_count": 4,
                                   "smoke": True}) == "device_check_tpu_tpu-v5-lite_x4_smoke"


def test_compare_curves_tolerances():
  ref = [2.4] * 10 + [2.2] * 10 + [2.0] * 10
  same = device_check.compare_curves(ref, ref)
  assert same["passed"] and same["max_window_rel_diff"] == 0
  # Per-step noise that cancels within a window passes; a curve that does not fall fails.
  noisy = [x * (1.06 if i % 2 else 0.94) for i, x in enumerate(ref)]
  assert not device_check.compare_curves(noisy, ref)["passed"]   # the first loss differs by 6 %
  noisy[0] = ref[0]
  assert device_check.compare_curves(noisy, ref)["passed"]
  flat = [2.4] * 30
  assert not device_check.compare_curves(flat, ref)["passed"]


def test_reference_covers_both_runs():
  """The stored CPU reference has each run's curve at the length the check trains."""
  ref = json.load(open(device_check.REFERENCE))
  assert ref["device_kind"] == "cpu"
  for run, spec in device_check.DIGITS_RUNS.items():
    assert len(ref["runs"][run]["losses"]) == spec["steps"]
  full = ref["runs"]["full"]
  # The tolerance is wider than the accelerators' kernel choices move the curve, and narrower than
  # the curve falls over the run: a device that trains a different network cannot pass.
  assert full["accelerator_kernels_max_window_rel_diff"] < device_check.CURVE_RTOL
  means = device_check.compare_curves(full["losses"], full["losses"])
  assert means["passed"]
  first, last = (sum(full["losses"][i:i + 10]) / 10 for i in (0, 30))
  assert (first - last) / first > 2 * device_check.CURVE_RTOL
