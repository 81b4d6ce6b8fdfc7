"""Test-session setup; must run before any JAX backend starts.

- Eight simulated CPU devices for the sharding tests, compiled at LLVM -O1 (`tests/cpu.py`).
- A persistent XLA compilation cache shared by the test workers and the processes the tests
  start (via the environment): most tests compile the same small networks, and a restarted
  train.py skips its compiles, as a user's would with the same cache.
"""
import os
import tempfile

import pytest

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """`(config, workdir, summary)` of a short digits run (8 steps, checkpoints at 4 and 8): the
  checkpoint of the evaluation, export and pipeline tests. Their files are one xdist group, so
  one worker trains it once."""
  from ge2mst_jax.train import loop as train_lib   # imported here: after the flags above
  from tests.test_train import small_digits
  workdir = str(tmp_path_factory.mktemp("digits"))
  cfg = small_digits(8, checkpoint_every=4)   # the train step most tests share: compiled once
  out = train_lib.train_and_evaluate(cfg, workdir, quiet=True)
  return cfg, workdir, out
