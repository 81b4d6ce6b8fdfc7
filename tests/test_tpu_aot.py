"""The TPU compile probe (benchmarks/tpu_aot.py) on a tiny model, where libtpu is installed.

libtpu is an optional extra (`pip install -e ".[tpu]"`), not installed in CI: there the test is
skipped, with the reason. The probe runs in its own process, because it needs JAX started with
libtpu's environment (TPU_ACCELERATOR_TYPE, ...), while this test session's JAX runs on 8
simulated CPU devices (conftest.py). Which Python runs it: `GE2MST_TPU_PYTHON` when set (e.g. a
separate virtual environment with the extra: GE2MST_TPU_PYTHON=/path/to/venv/bin/python), else
the test's own interpreter when libtpu is importable there. Deciding this starts no JAX backend.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT

ENV_VAR = "GE2MST_TPU_PYTHON"
ROW_KEYS = {"model", "topology", "dtype", "global_batch", "fsdp", "step", "peak_bytes_per_chip", "hbm_fraction",
            "flops_per_image", "hbm_bytes_per_image", "roofline_images_per_s_per_chip", "compile_s",
            "n_all_reduce", "n_all_gather", "n_reduce_scatter", "n_collective_permute", "n_all_to_all"}


def tpu_python() -> tuple[str | None, str]:
  """(interpreter with libtpu, '') or (None, why not)."""
  exe = os.environ.get(ENV_VAR)
  if exe:
    if not os.access(exe, os.X_OK):
      return None, f"{ENV_VAR}={exe} is not an executable"
    has = subprocess.run([exe, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('libtpu') is None)"],
                         capture_output=True, timeout=60).returncode == 0
    return (exe, "") if has else (None, f"libtpu is not importable by {ENV_VAR}={exe}")
  if importlib.util.find_spec("libtpu") is not None:
    return sys.executable, ""
  return None, (f'libtpu is not installed (pip install -e ".[tpu]", or set {ENV_VAR} to a Python that has it): '
                "the TPU compile probe cannot run")


@pytest.mark.slow
def test_tpu_aot_probe_compiles_tiny_model_for_v5e(tmp_path):
  exe, why = tpu_python()
  if exe is None:
    pytest.skip(why)
  # The probe sets its own platform and libtpu variables; drop the test session's CPU-only ones.
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR") and not k.startswith("TPU_")}
  r = subprocess.run([exe, os.path.join(ROOT, "benchmarks", "tpu_aot.py"), "--smoke", "--topology", "v5e:2x2",
                      "--out", str(tmp_path), "--hlo_dir", str(tmp_path / "hlo")],
                     capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.load(open(tmp_path / "tpu_aot_smoke.json"))
  assert res["smoke"] is True and res["compiler"].startswith("libtpu")
  rows = {row["step"]: row for row in res["rows"]}
  assert set(rows) == {"train", "forward_quantize", "forward_spike"}
  for step, row in rows.items():
    assert ROW_KEYS <= set(row), step
    assert row["model"] == "ge2mst_tiny" and row["topology"] == "v5e:2x2" and row["chips"] == 4
    assert 0 < row["peak_bytes_per_chip"] < 16e9 and row["flops_per_image"] > 0 and row["hbm_bytes_per_image"] > 0
    assert row["roofline_images_per_s_per_chip"] > 0
    assert os.path.getsize(row["hlo_file"]) > 0
  # Data parallelism over 4 chips: the gradients are summed across chips; evaluation needs no
  # reduction of parameters. A forward pass does fewer FLOPs than forward + backward.
  assert rows["train"]["n_all_reduce"] + rows["train"]["n_reduce_scatter"] >= 1
  # GW-SSA's training core is the Pallas kernel, run on each chip's own images (no gather of the batch).
  assert rows["train"]["attention_kernel"] == "pallas" and rows["train"]["n_all_gather"] == 0
  assert "tpu_custom_call" in open(rows["train"]["hlo_file"]).read()
  assert rows["forward_quantize"]["flops_per_image"] < rows["train"]["flops_per_image"]
  # What moves to or from HBM is part of what cost analysis counts (which adds on-chip buffers).
  for step, row in rows.items():
    assert 0 < row["hlo_hbm_bytes_per_image"] <= row["hbm_bytes_per_image"], step
  # One block alone: Stage 2's GW-SSA block, its train forward and backward on one chip.
  r = subprocess.run([exe, os.path.join(ROOT, "benchmarks", "tpu_aot.py"), "--smoke", "--blocks", "2:1:2",
                      "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  (block,) = json.load(open(tmp_path / "tpu_aot_blocks2-1-2_smoke.json"))["rows"]
  assert block["step"] == "blocks 2:1:2" and block["blocks"] == ["AttentionBlock"] and block["chips"] == 1
  assert block["block_input_shape"] == [8, 16, 16, 32]   # tiny @32: Stage 2 attends over 16x16 tokens of 32 channels
  assert 0 < block["hlo_hbm_bytes_per_image"] <= block["hbm_bytes_per_image"] < rows["train"]["hbm_bytes_per_image"]


@pytest.mark.slow
def test_a_block_range_outside_the_network_is_one_clear_line():
  """Checked on the network's shapes before libtpu starts: runs anywhere."""
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tpu_aot.py"), "--smoke", "--blocks", "2:3:9"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --blocks='2:3:9': use STAGE:FIRST:END with 1 <= STAGE <= 4 and 0 <= FIRST < END <= the stage's "
      "block count (stage 1: 3, stage 2: 3, stage 3: 3, stage 4: 3)."), r.stderr


def test_unknown_topology_is_one_clear_line():
  """Checked before JAX or libtpu start: runs anywhere, in a moment."""
  for topology, message in (("v4:2x2x1", "error: unknown TPU generation in --topology='v4:2x2x1': use one of "
                                         "v5e:2x2, v5p:2x2x1, v6e:2x2."),
                            ("v5p:2x2", "error: --topology='v5p:2x2': v5p topologies have 3 dimensions, "
                                        "e.g. v5p:2x2x1.")):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tpu_aot.py"), "--topology", topology],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == message, r.stderr


@pytest.fixture(scope="module")
def hlo_traffic():
  """benchmarks/hlo_traffic.py, loaded from its file (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location("hlo_traffic", os.path.join(ROOT, "benchmarks", "hlo_traffic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The shape of libtpu's as_text() (from a compiled GW-SSA block, trimmed): the input `x` in HBM,
# prefetched into VMEM (S(1)) in two async slices, the halves joined there, one fusion reading
# the VMEM copy and the HBM weight and writing its output to HBM.
_HLO = """HloModule jit_run, entry_computation_layout={(bf16[4,8]{1,0})->bf16[4,8]{1,0}}

%fused_computation (p0: bf16[4,8], p1: f32[8]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %r = bf16[4,8]{1,0:T(8,128)(2,1)} add(%p0, %p0)
}

ENTRY %main.1 (x.1: bf16[4,8], w.1: f32[8]) -> bf16[4,8] {
  %x.1 = bf16[4,8]{1,0:T(8,128)(2,1)} parameter(0), metadata={op_name="x"}
  %w.1 = f32[8]{0:T(128)} parameter(1)
  %slice-start = ((bf16[4,8]{1,0:T(8,128)(2,1)}), bf16[2,8]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%x.1), slice={[0:2], [0:8]}
  %slice-start.1 = ((bf16[4,8]{1,0:T(8,128)(2,1)}), bf16[2,8]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%x.1), slice={[2:4], [0:8]}
  %slice-done = bf16[2,8]{1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start)
  %slice-done.1 = bf16[2,8]{1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start.1)
  %custom-call = bf16[4,8]{1,0:T(8,128)(2,1)S(1)} custom-call(%slice-done, %slice-done.1), custom_call_target="ConcatBitcast"
  ROOT %fusion = bf16[4,8]{1,0:T(8,128)(2,1)} fusion(%custom-call, %w.1), kind=kLoop, calls=%fused_computation
}
"""


def test_hlo_traffic_splits_bytes_by_memory_space(hlo_traffic):
  """HBM: the two slices read from x (32 B each) and the fusion's weight (32 B) and output (64 B).
  On chip: the slices' VMEM halves (32 B each), the join (in 64 B, out 64 B), the fusion's input
  (64 B). The fused computation's own parameters are not traffic of the program."""
  t = hlo_traffic.traffic(_HLO)
  assert t["hbm_bytes"] == 32 + 32 + 32 + 64
  assert t["on_chip_bytes"] == 32 + 32 + 64 + 64 + 64
  assert t["hbm_bytes_by_op"] == {"fusion": 96, "slice-start": 64} and t["while_loops"] == 0
  assert hlo_traffic.arrays("(f32[]{:T(128)}, bf16[2,3]{1,0:T(8,128)(2,1)S(1)})") == [(4, 0), (12, 1)]
  with pytest.raises(ValueError, match="No ENTRY computation"):
    hlo_traffic.traffic("HloModule m\n")


def test_hlo_traffic_counts_an_async_copy_once_in_each_memory_space(hlo_traffic):
  """XLA's copy-start returns (destination, source, context), slice-start ((source), destination,
  context): a prefetch of the weight into VMEM is one HBM read (32 B) and one VMEM write (32 B),
  and the fusion then reads the weight from VMEM."""
  prefetched = _HLO.replace(
      "  ROOT %fusion = bf16[4,8]{1,0:T(8,128)(2,1)} fusion(%custom-call, %w.1)",
      "  %copy-start = (f32[8]{0:T(128)S(1)}, f32[8]{0:T(128)}, u32[]{:S(2)}) copy-start(%w.1)\n"
      "  %copy-done = f32[8]{0:T(128)S(1)} copy-done(%copy-start)\n"
      "  ROOT %fusion = bf16[4,8]{1,0:T(8,128)(2,1)} fusion(%custom-call, %copy-done)")
  t = hlo_traffic.traffic(prefetched)
  assert t["hbm_bytes_by_op"] == {"fusion": 64, "slice-start": 64, "copy-start": 32}
  assert t["on_chip_bytes"] == 32 + 32 + 64 + 64 + 64 + 32 + 32
