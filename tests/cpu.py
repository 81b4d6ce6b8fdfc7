"""How the tests run XLA on this machine's CPU: in their own processes and in those they start.

The tests' programs are tiny and compiled once each, so compiling dominates; two flags make it
cheaper without changing what is computed:
- LLVM at -O1 instead of XLA's CPU default (-O3). Measured on a 2-core machine (2026-11-25): the
  model's jitted initialisation compiles in 2.8 s instead of 7.9 s and the train step in 11.0 s
  instead of 13.5 s, while the train step runs as fast (0.086 s vs 0.093 s on 8 simulated devices).
  XLA's HLO passes are the same at every level; only the machine-code optimisation differs.
- XLA's older elementwise-fusion code generator instead of the MLIR fusion emitters: those build
  an MLIR context and run a pass pipeline for every fusion. Measured on the same machine
  (2026-12-01, a day it ran at ~0.3x its best matmul rate): the tests' small network's forward and
  backward pass compiles in 14.9 s instead of 18.6-20.0 s; it runs in 0.046-0.064 s either way.
"""
import os

FLAGS = ("--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int, base: str = "") -> str:
  return " ".join((base, *FLAGS, f"--xla_force_host_platform_device_count={devices}")).strip()


def env(devices: int = 1) -> dict:
  """The environment of a JAX process the tests start: CPU only, `devices` simulated devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}
