"""How the tests run XLA on this machine's CPU: in their own processes and in those they start.

LLVM at -O1 instead of XLA's CPU default (-O3): the tests' programs are tiny and compiled once
each, so compiling dominates. Measured on a 2-core machine (2026-11-25): the model's jitted
initialisation compiles in 2.8 s instead of 7.9 s and the train step in 11.0 s instead of
13.5 s, while the train step runs as fast (0.086 s vs 0.093 s on 8 simulated devices). XLA's
HLO passes are the same at every level; only the machine-code optimisation differs.
"""
import os

LLVM_OPT = "--xla_backend_optimization_level=1"


def xla_flags(devices: int, base: str = "") -> str:
  return f"{base} {LLVM_OPT} --xla_force_host_platform_device_count={devices}".strip()


def env(devices: int = 1) -> dict:
  """The environment of a JAX process the tests start: CPU only, `devices` simulated devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}
