"""Jitted programs built once per process for each config and mesh.

A notebook, a sweep or a test suite calls `train_and_evaluate` (or evaluates checkpoints) many
times in one process. `jax.jit` keys its trace cache on the function object, so each call's new
closures would trace and lower the same steps again, seconds per call even for a small network
and even when the persistent compilation cache holds the binaries. The builders below return the
program already built for an equal key: the config without the keys only the loop reads, the
mesh, the state's shardings and the builder's other arguments. A config that differs anywhere
else builds anew, so a key never maps to a program built from something else.
"""
from __future__ import annotations

import collections
import copy
import functools
import json

import jax

# Read by the loop around the programs, never by what they compute: changing one (a checkpoint
# interval, the evaluation batch size, whose shape jit keys on anyway) reuses the programs. A key
# listed here by mistake would reuse a stale program: tests/test_programs.py traces every reused
# builder's programs with all of these changed and requires them identical, and checks that
# changing any other key gives a new key.
LOOP_ONLY_KEYS = frozenset({
    "async_checkpoints", "checkpoint_every", "compile_cache_dir", "distributed", "eval_batch_size",
    "eval_every", "eval_modes", "init_from", "keep_checkpoints", "lease", "log_every", "preempted_exit_code",
    "profile", "watchdog_secs"})
MAX_PROGRAMS = 8    # per builder; the oldest goes first (each holds its compiled executables)


def config_key(cfg) -> str:
  """The config's contents that programs are built from, as a canonical string."""
  return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in LOOP_ONLY_KEYS}, sort_keys=True,
                    default=repr)


def _arg_key(arg):
  """A train setup by its mesh and shardings (its state changes every step); anything else as is."""
  if hasattr(arg, "mesh") and hasattr(arg, "shardings"):
    leaves, treedef = jax.tree.flatten(arg.shardings)
    return arg.mesh, treedef, tuple(leaves)
  return arg


def reused(build):
  """`build(cfg, *args)` once per (config key, args); later calls get what that call returned.

  `args` are hashable (a mesh, a tuple of modes) or a train setup, keyed by its mesh and shardings.
  `cached.cache_clear()` drops every program built so far, and with them their compiled executables.
  """
  cache: collections.OrderedDict = collections.OrderedDict()

  @functools.wraps(build)
  def cached(cfg, *args):
    key = (config_key(cfg), *map(_arg_key, args))
    if key in cache:
      cache.move_to_end(key)
      return cache[key]
    # A copy: jit traces again for a new batch shape, reading the config then, and the caller
    # may have edited its own config by that time.
    cache[key] = program = build(copy.deepcopy(cfg), *args)
    if len(cache) > MAX_PROGRAMS:
      cache.popitem(last=False)
    return program

  cached.cache_clear = cache.clear
  return cached
