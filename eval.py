"""Evaluate a Ge2mS-T checkpoint as a quantized and as a spiking network, with an energy report.

  python eval.py --workdir workdirs/digits                     # newest checkpoint, config from the workdir
  python eval.py --workdir DIR --checkpoint DIR/checkpoints/best --sweep_T=2,4,8 --sweep_K=1,2
Writes DIR/eval/report.json, report.md, sops.png, firing_rates.png and energy.png (docs/energy.md).
"""
import sys

from ge2mst_jax.io import hugepages

if __name__ == "__main__":
  hugepages.reexec_with_huge_pages()  # first, before JAX or a config file is imported: they would load twice

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ge2mst_jax.io.cli import guard, load_config, parse_flags  # noqa: E402

guard(lambda: config_flags.DEFINE_config_file("config", None, "Config file (default: the work directory's config.json).",
                                              lock_config=False))
flags.DEFINE_string("workdir", None, "Work directory written by train.py.")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory (default: WORKDIR/checkpoints, newest step).")
flags.DEFINE_integer("step", None, "Evaluate this step instead of the newest.")
flags.DEFINE_list("sweep_T", [], "Also evaluate at these T (same weights), e.g. 2,4,8.")
flags.DEFINE_list("sweep_K", [], "Also evaluate at these K (with each T of the sweep).")
flags.DEFINE_integer("energy_images", 64, "Test images whose spikes are counted for SOPs and energy.")
flags.DEFINE_string("out", None, "Report directory (default: WORKDIR/eval).")
flags.DEFINE_bool("audit", False, "Also audit spike mode on the energy images: is every synaptic operation driven by "
                  "spikes, and do SOPs counted from the operands match energy.py's? Exits 1 if not.")
# Acted on before absl parses (hugepages.reexec_with_huge_pages); defined here for --help.
flags.DEFINE_enum(hugepages.FLAG, "auto", hugepages.MODES, hugepages.HELP)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from ge2mst_jax.evaluate import report as evaluation
  from ge2mst_jax.io import paths, saved_config
  from ge2mst_jax.train import sharding
  from ge2mst_jax.io.errors import CheckpointError

  if not FLAGS.workdir and not FLAGS.checkpoint:
    sys.exit("eval.py: pass --workdir (a train.py work directory) or --checkpoint.")
  # Local paths or gs:// URLs alike.
  workdir = paths.resolve(FLAGS.workdir) if FLAGS.workdir else paths.resolve(FLAGS.checkpoint.rstrip("/")).parent
  cfg = load_config()
  if cfg is None:
    try:
      cfg = saved_config.read(workdir)
    except CheckpointError as e:
      sys.exit(f"eval.py: {e} Pass --config configs/NAME.py for this checkpoint.")
    except Exception as e:  # an unreachable bucket
      sys.exit(f"eval.py: cannot read {workdir}: {paths.describe(e)}")
  sharding.enable_compile_cache(cfg.compile_cache_dir)
  ckpt_dir = paths.resolve(FLAGS.checkpoint) if FLAGS.checkpoint else workdir / "checkpoints"
  out = paths.resolve(FLAGS.out) if FLAGS.out else workdir / "eval"
  try:
    rep = evaluation.evaluate_checkpoint(cfg, ckpt_dir, FLAGS.step, FLAGS.energy_images, audit=FLAGS.audit)
    sweep = []
    Ts = [int(t) for t in FLAGS.sweep_T] or ([rep["T"]] if FLAGS.sweep_K else [])
    for T in Ts:
      for K in [int(k) for k in FLAGS.sweep_K] or [min(rep["K"], T)]:
        if K <= T:
          sweep.append(evaluation.evaluate_checkpoint(cfg, ckpt_dir, rep["step"], FLAGS.energy_images, T=T, K=K))
  except (CheckpointError, ValueError) as e:
    sys.exit(f"eval.py: {e}")
  files = evaluation.write_report(rep, out, sweep)
  print(evaluation.markdown_report(rep, sweep).split("## SOPs per stage")[0])
  print(f"report: {files['md']}  json: {files['json']}  plots: {', '.join(files['plots'])}")
  if FLAGS.audit:
    from ge2mst_jax.evaluate import spike_audit
    result = rep["spike_audit"]
    print(spike_audit.markdown_table(result))
    if result["unexpected"] or not result["sops_match"]:
      sys.exit(f"eval.py: spike audit failed: non-spike synaptic operations in {result['unexpected'] or 'none'}; "
               f"SOPs {'match' if result['sops_match'] else 'do not match'} energy.py's (see {files['md']}).")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
