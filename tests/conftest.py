"""Test-session setup; must run before any JAX backend starts.

- Eight simulated CPU devices for the sharding tests, compiled at LLVM -O1 (`tests/cpu.py`).
- A persistent XLA compilation cache shared by the test workers and the processes the tests
  start (via the environment): most tests compile the same small networks, and a restarted
  train.py skips its compiles, as a user's would with the same cache.
"""
import os
import tempfile

from tests import cpu

os.environ["XLA_FLAGS"] = cpu.xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ge2mst_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
  """The slow (multi-process) tests first: two workers then finish together instead of one
  starting a long test when the other has nothing left (longest-first scheduling)."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
