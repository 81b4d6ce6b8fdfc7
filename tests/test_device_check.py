"""benchmarks/device_check.py --smoke: every part runs at tiny sizes and writes its JSON and Markdown."""
import json
import os
import subprocess
import sys

import pytest

from tests import cpu
from tests.test_train import ROOT

# A process that compiles a dozen small programs (~45 s cold on one core); one worker runs the module.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("device_check")]

SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")
PARTS = ("environment", "agreement", "digits", "train_step", "variants", "eval")


def _run(out, *args):
  r = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), *args], capture_output=True, text=True,
                     timeout=600, cwd=ROOT, env=cpu.env(devices=1))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  stdout = _run(out)
  with open(out / "device_check_cpu_x1_smoke.json") as f:
    return out, json.load(f), stdout


def test_every_part_runs_and_records_its_figures(smoke):
  _, res, _ = smoke
  assert res["benchmark"] == "device_check" and res["smoke"] and res["budget_s"] == 480
  assert res["platform"] == "cpu" and res["commit"] and res["date"]
  parts = res["parts"]
  assert tuple(parts) == PARTS and all(p["status"] == "ok" for p in parts.values())
  env = parts["environment"]
  assert env["jax"] and env["jaxlib"] and env["memory_bytes_limit"] is None and "memory_stats()" in env["memory_stats_note"]
  assert env["peak_flops"] is None   # no peak for a CPU: no MFU
  ag = parts["agreement"]
  assert [(r["dtype"], r["precision"]) for r in ag["rows"]] == [
      ("float32", "default"), ("float32", "highest"), ("bfloat16", "default"), ("bfloat16", "highest")]
  assert ag["passed"] and not ag["float32_matmul_follows_precision"]   # XLA:CPU: one result serves both
  dg = parts["digits"]
  assert dg["passed"] and dg["first_loss_rel_diff"] <= dg["first_loss_rtol"] and len(dg["losses"]) == 4
  tr = parts["train_step"]["row"]
  assert tr["images_per_s"] > 0 and tr["step_s_min"] <= tr["step_s"] <= tr["step_s_max"]
  assert tr["cost_analysis_flops_per_image"] > 0 and tr["peak_bytes"] > 0 and tr["compile_s"] > 0
  assert tr["mfu"] is None and "PEAKS" in tr["mfu_note"]
  assert tr["device_peak_bytes_in_use"] is None and "memory_stats()" in tr["memory_note"]
  var = parts["variants"]
  assert var["rows"]["remat_block"]["remat"] == "block" and "TPU-only" in var["notes"][0]
  ev = parts["eval"]
  assert all(ev[f"{k}_images_per_s"] > 0 for k in ("quantize", "spike", "spike_code"))


def test_markdown_summary_and_side_by_side_table(smoke):
  out, res, stdout = smoke
  md = (out / "device_check_cpu_x1_smoke.md").read_text()
  assert "| train: images/s |" in md and "| spike = quantize, bfloat16 @highest: agreement | 100.00% |" in md
  assert all(f"| {p} | ok |" in md for p in PARTS)
  table = (out / "device_check_smoke.md").read_text()
  assert "| figure | cpu x1 |" in table
  assert f"wrote {out / 'device_check_cpu_x1_smoke'}.json and .md" in stdout


def test_a_spent_budget_skips_parts_with_a_note(smoke, tmp_path):
  _run(tmp_path, "--budget_s", "0", "--parts", "environment,train_step")
  with open(tmp_path / "device_check_cpu_x1_smoke.json") as f:
    parts = json.load(f)["parts"]
  assert parts["environment"]["status"] == "ok"   # what ran where: always recorded
  assert parts["train_step"]["status"] == "skipped" and "budget of 0 s is spent" in parts["train_step"]["note"]
