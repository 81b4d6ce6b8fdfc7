"""How the tests run XLA on this machine's CPU: in their own processes and in those they start.

The tests' programs are tiny and compiled once each, so compiling dominates; two flags make it
cheaper without changing what is computed:
- LLVM at -O1 instead of XLA's CPU default (-O3): the model's jitted initialisation compiles
  about 2.8x faster and the train step about 1.2x, while the train step runs as fast. XLA's HLO
  passes are the same at every level; only the machine-code optimisation differs.
- XLA's older elementwise-fusion code generator instead of the MLIR fusion emitters: those build
  an MLIR context and run a pass pipeline for every fusion: the tests' small network's forward
  and backward pass compiles about 1.3x faster and runs as fast.
"""
import os

FLAGS = ("--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int, base: str = "") -> str:
  return " ".join((base, *FLAGS, f"--xla_force_host_platform_device_count={devices}")).strip()


def env(devices: int = 1) -> dict:
  """The environment of a JAX process the tests start: CPU only, `devices` simulated devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}
