"""Device mesh, parameter sharding rules and multi-host start-up.

The mesh has a `data` axis and an `fsdp` axis. The batch is split over both; parameters
and optimizer state are split over `fsdp` by rules (regex on the parameter path ->
which dimension to shard), falling back to the largest dimension the axis divides.
Small tensors (BatchNorm, thresholds, biases) stay replicated.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
# (path regex, dimension to shard over 'fsdp'); None means replicate. First match wins.
DEFAULT_RULES = (
    (r".*kernel(/value)?", -1),   # conv / linear kernels (k, k, cin, cout): shard output channels
    (r".*", None),
)
MIN_SHARD_SIZE = 2 ** 12


def maybe_initialize_distributed(cfg) -> None:
  """`jax.distributed.initialize` when this job spans several processes (never twice)."""
  dist = cfg.distributed
  if not dist.enabled:
    return
  if jax.distributed.is_initialized():
    return
  # Empty values mean "detect from the cluster environment" (TPU slices, SLURM, ...).
  auto = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
  kwargs = {k: dist[k] for k, unset in auto.items() if dist[k] is not None and dist[k] != unset}
  if dist.cpu or jax.config.jax_platforms == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
  jax.distributed.initialize(**kwargs)


def enable_compile_cache(directory: str = "") -> str | None:
  """Turns on JAX's persistent compilation cache (a local directory; "" = the user's cache
  directory, "off" = none): a restarted or requeued job skips its compiles. A cache directory
  already set through JAX_COMPILATION_CACHE_DIR is left as it is."""
  if directory == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not directory:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "ge2mst_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def from_process_0(values: list[int]) -> list[int]:
  """Process 0's list of integers, on every process (decisions that must be equal on all hosts)."""
  if jax.process_count() == 1:
    return list(values)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
  buf = np.full(max(n, 1), -1, np.int32)
  if jax.process_index() == 0:
    buf[:n] = values
  return [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n]]


def all_hosts(ok: bool) -> bool:
  """True on every process when `ok` is True on every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(np.asarray(multihost_utils.process_allgather(np.int32(ok)))))


def make_mesh(fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices; `fsdp=-1` puts every device on the fsdp axis."""
  devices = devices if devices is not None else jax.devices()
  n = len(devices)
  fsdp = n if fsdp == -1 else fsdp
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices: choose a divisor of {n} (or -1 for all).")
  return jax.make_mesh((n // fsdp, fsdp), DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_spec(path: str, shape: tuple, fsdp_size: int, rules=DEFAULT_RULES) -> P:
  """PartitionSpec of one parameter (or optimizer moment) with the given path and shape."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE or not shape:
    return P()
  for pattern, dim in rules:
    if re.fullmatch(pattern, path):
      if dim is None:
        return P()
      dims = [dim % len(shape)] + sorted(range(len(shape)), key=lambda d: -shape[d])
      for d in dims:
        if shape[d] % fsdp_size == 0:
          spec = [None] * len(shape)
          spec[d] = "fsdp"
          return P(*spec)
      return P()
  return P()


def state_shardings(abstract_state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for every leaf of a (possibly abstract) train-state pytree."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(_path_str(path), tuple(getattr(x, "shape", ())), fsdp, rules)),
      abstract_state)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def global_batch(local: dict, mesh) -> dict:
  """Assembles each process's local batch into one global array sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}
