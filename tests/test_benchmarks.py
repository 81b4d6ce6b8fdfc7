"""Benchmarks run in smoke mode so they cannot rot; the smoke runs check the JSON, not speed."""
import json
import os
import subprocess
import sys

import pytest

from tests import cpu
from tests.test_train import ROOT

pytestmark = pytest.mark.slow   # processes, buckets and long runs: the full suite only

MACHINE_KEYS = {"benchmark", "date", "commit", "machine", "processor", "cpu_count", "device_kind", "device_count",
                "platform", "jax", "flax", "python", "smoke", "rows"}
ROW_KEYS = {
    "train_step": {"model", "depths", "image_size", "batch", "dtype", "step_s", "images_per_s", "model_flops_per_s",
                   "macs_per_image", "fraction_of_matmul_rate", "peak_bytes", "temp_bytes", "trace_s", "compile_s"},
    "paradigms": {"paradigm", "depths", "T", "K", "step_s", "images_per_s", "peak_bytes", "temp_bytes", "time_vs_T1",
                  "memory_vs_T1", "sops_per_image", "mean_firing_rate"},
    "inference": {"model", "depths", "T", "K", "quantize_s", "spike_s", "spike_over_quantize", "spike_code_s",
                  "spike_code_over_quantize", "code_vs_steps_max_abs_logit_diff", "sops_per_image",
                  "flops_per_image", "sops_over_flops", "evaluator_images_per_s", "forwards_images_per_s",
                  "evaluator_over_forwards"},
    "input_pipeline": {"stage", "batch", "images_per_s", "vs_train_step"},
    "prepare_imagenet": {"stage", "workers", "images", "images_per_s", "images_per_s_per_core", "imagenet_hours"},
    "energy": {"model", "depths", "image_size", "T", "K", "images", "weights", "sops_per_image", "commit", "paper_uj",
               "snn_uj", "qann_uj", "cheaper", "paper_uj_no_reuse", "snn_uj_no_reuse", "qann_uj_no_reuse",
               "cheaper_no_reuse"},
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """Every benchmark's smoke mode, run one after another in one process, as a user's script would
  (one real device: the tests' 8 simulated CPU devices are for sharding)."""
  out = tmp_path_factory.mktemp("benchmarks")
  code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
          f"import {', '.join(sorted(ROW_KEYS))}; " +
          "; ".join(f"{name}.main(['--smoke', '--out', {str(out)!r}])" for name in sorted(ROW_KEYS)))
  env = cpu.env(devices=1)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  return out, r.stdout


@pytest.mark.xdist_group("benchmarks")
@pytest.mark.parametrize("name", sorted(ROW_KEYS))
def test_benchmark_smoke_writes_its_json(name, smoke_runs):
  tmp_path, stdout = smoke_runs
  res = json.load(open(tmp_path / f"{name}_smoke.json"))
  assert MACHINE_KEYS <= set(res) and res["benchmark"] == name and res["smoke"] is True
  assert res["rows"] and all(ROW_KEYS[name] <= set(row) for row in res["rows"])
  assert all(row["images_per_s"] > 0 for row in res["rows"] if "images_per_s" in row)
  assert all(row["depths"] == [1, 0, 0, 0] for row in res["rows"] if "depths" in row)   # --smoke's network
  if name == "train_step":
    assert res["matmul_flops_per_s"] > 0 and 0 < res["rows"][0]["fraction_of_matmul_rate"]
  if name == "paradigms":
    assert {row["paradigm"] for row in res["rows"]} == {"expg", "stbp"}
    assert all(row["peak_bytes"] > row["temp_bytes"] > 0 for row in res["rows"])
  assert f"wrote {tmp_path / name}_smoke.json" in stdout
