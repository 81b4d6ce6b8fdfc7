"""Benchmarks run in smoke mode so they cannot rot; the smoke runs check the JSON, not speed."""
import json
import os
import subprocess
import sys

from tests.test_train import ROOT


def test_train_step_benchmark_smoke(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--smoke", "--out",
                      str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.load(open(tmp_path / "train_step_smoke.json"))
  assert {"date", "machine", "device_kind", "jax", "matmul_flops_per_s", "rows"} <= set(res)
  row = res["rows"][0]
  assert {"model", "batch", "images_per_s", "model_flops_per_s", "fraction_of_matmul_rate"} <= set(row)
  assert row["images_per_s"] > 0 and 0 < row["fraction_of_matmul_rate"]
