"""Train Ge2mS-T.

  python train.py                                   # built-in digits, ./workdirs/digits
  python train.py --config configs/cifar10.py:small --workdir /ckpt/c10 --config.batch_size=256
"""
import os
import sys

from ge2mst_jax.io import hugepages

if __name__ == "__main__":
  hugepages.reexec_with_huge_pages()  # first, before JAX or a config file is imported: they would load twice

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ge2mst_jax.io.cli import guard, load_config, parse_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")

# config_flags applies --config.* overrides while defining the flag
guard(lambda: config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training configuration file.",
                                             lock_config=True))
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics), local or gs://bucket/path. "
                    "Default: ./workdirs/<data set>.")
flags.DEFINE_bool("quiet", False, "No progress output (metrics still go to the work directory).")
# Acted on before absl parses (hugepages.reexec_with_huge_pages); defined here for --help.
flags.DEFINE_enum(hugepages.FLAG, "auto", hugepages.MODES, hugepages.HELP)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: options are --config, --workdir, --config.KEY=VALUE.")
  # After flag parsing: JAX starts only for a valid command line.
  from ge2mst_jax.io import errors
  from ge2mst_jax.train import sharding, loop as train_lib

  cfg = load_config()
  sharding.enable_compile_cache(cfg.compile_cache_dir)
  workdir = FLAGS.workdir or os.path.join("workdirs", cfg.data.name)
  try:
    summary = train_lib.train_and_evaluate(cfg, workdir, quiet=FLAGS.quiet)
  except errors.Preempted as e:
    print(f"train.py: {e}", flush=True)
    sys.exit(cfg.preempted_exit_code)
  except (ValueError, RuntimeError, errors.NonFiniteError) as e:  # CheckpointError is a RuntimeError
    sys.exit(f"train.py: {e}")
  summary.pop("state"), summary.pop("setup")
  print("\n== Ge2mS-T training summary ==")
  print(f"work directory     : {summary['workdir']}")
  print(f"steps              : {summary['step']}  (T={summary['T']}, K={summary['K']})")
  print(f"test examples      : {int(summary['examples'])}")
  for mode in ("quantize", "spike", "stbp"):
    if f"accuracy_{mode}" in summary:
      print(f"accuracy ({mode}){' ' * (8 - len(mode))}: {summary[f'accuracy_{mode}']:.4f}")
  if "prediction_agreement" in summary:
    print(f"prediction agreement spike vs quantize: {summary['prediction_agreement']:.4f} "
          f"(max relative logit difference {summary['max_rel_logit_diff']:.2e})")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
