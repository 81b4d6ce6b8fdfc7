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

from ge2mst_jax import errors, train_lib
from tests.test_train import small_digits


def cache_compiles_on_every_host():
  """Lets hosts other than 0 write the persistent compilation cache too.

  JAX writes it from process 0 only (many writers contend on a shared bucket). On CPU each
  process's cache key differs (it hashes the process's own topology), so process 0's entries
  never serve the others and every test run compiled them again on hosts 1..n-1: the tests' runs
  of the same program on the same host count now compile once per host instead of once per run.
  """
  from jax._src import compilation_cache, compiler  # pylint: disable=g-import-not-at-top

  def write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if not host_callbacks:  # as JAX's own writer: host callbacks are baked into the binary
      compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                int(compile_time_secs))
  compiler._cache_write = write


def main(argv):
  pid, n, port, workdir, *overrides = argv[1:]
  kw = {k: eval(v) for k, v in (o.split("=", 1) for o in overrides)}  # test-controlled literals
  cfg = small_digits(kw.pop("total_steps", 8), **kw)
  cfg.distributed.enabled = True
  cfg.distributed.coordinator_address = f"localhost:{port}"
  cfg.distributed.num_processes, cfg.distributed.process_id = int(n), int(pid)
  if int(pid):
    cache_compiles_on_every_host()
  try:
    out = train_lib.train_and_evaluate(cfg, workdir, quiet=True)
  except errors.Preempted as e:
    print(json.dumps({"pid": jax.process_index(), "preempted_at": int(str(e).split(" at step ")[1].split(";")[0])}),
          flush=True)
    return
  leaves = jax.tree.leaves(nnx.to_pure_dict(out["state"])[0])
  digest = float(sum(np.abs(np.asarray(multihost_utils.process_allgather(l, tiled=True), np.float64)).sum()
                     for l in leaves))
  print(json.dumps({"pid": jax.process_index(), "n": jax.process_count(), "digest": digest,
                    **{k: v for k, v in out.items() if k.startswith(("accuracy", "prediction", "examples"))}}),
        flush=True)


if __name__ == "__main__":
  main(sys.argv)
