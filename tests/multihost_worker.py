"""One host of a multi-process training run on CPU, for the tests: `python -m tests.multihost_worker
PROCESS_ID NUM_PROCESSES PORT WORKDIR [KEY=VALUE ...]` (config overrides of the tests' small
digits config). Prints one JSON line: the run's summary and a digest of its parameters, or the
step at which it was preempted."""
import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ge2mst_jax.io import errors
from ge2mst_jax.train import loop as train_lib
from tests.test_train import small_digits


def share_compiles_between_hosts():
  """Hosts 1..n-1 take host 0's compiled programs instead of compiling them again, as on a pod.

  JAX's `jax_share_binary_between_hosts` does this on TPU: host 0 compiles a program that spans
  hosts and hands the binary to the others under its persistent-cache key. On CPU that key also
  hashes each process's own topology fingerprint, which differs between processes: the others
  would wait for a key host 0 never writes (and without sharing, every host compiled everything,
  each writing a cache entry that only it could read). Hashed by the devices instead (JAX's own
  way for a backend without a topology; the device assignment stays in the key), the key is the
  same on every host: one compile per program, and the next run of the same hosts reads it.
  """
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top
  cache_key._hash_accelerator_config = cache_key._hash_devices
  jax.config.update("jax_share_binary_between_hosts", True)


def main(argv):
  pid, n, port, workdir, *overrides = argv[1:]
  kw = {k: eval(v) for k, v in (o.split("=", 1) for o in overrides)}  # test-controlled literals
  cfg = small_digits(kw.pop("total_steps", 8), **kw)
  cfg.distributed.enabled = True
  cfg.distributed.coordinator_address = f"localhost:{port}"
  cfg.distributed.num_processes, cfg.distributed.process_id = int(n), int(pid)
  share_compiles_between_hosts()
  try:
    out = train_lib.train_and_evaluate(cfg, workdir, quiet=True)
  except errors.Preempted as e:
    print(json.dumps({"pid": jax.process_index(), "preempted_at": int(str(e).split(" at step ")[1].split(";")[0])}),
          flush=True)
    return
  leaves = jax.tree.leaves(nnx.to_pure_dict(out["state"])["model"])
  digest = float(sum(np.abs(np.asarray(multihost_utils.process_allgather(l, tiled=True), np.float64)).sum()
                     for l in leaves))
  print(json.dumps({"pid": jax.process_index(), "n": jax.process_count(), "digest": digest,
                    **{k: v for k, v in out.items() if k.startswith(("accuracy", "prediction", "examples"))}}),
        flush=True)


if __name__ == "__main__":
  main(sys.argv)
