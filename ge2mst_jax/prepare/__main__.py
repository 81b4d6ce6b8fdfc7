"""python -m ge2mst_jax.prepare DATASET --manual_dir DIR [--data_dir OUT] [--workers N] [--frames T --size S]

DATASET: cifar10, cifar100, imagenet2012 or cifar10_dvs. What DIR must hold: docs/data.md.
An interrupted run is resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import os
import sys

from ge2mst_jax.io import cli
from ge2mst_jax.io.errors import DataError
from ge2mst_jax.prepare import cifar, cifar10_dvs, events, imagenet, writer

DATASETS = ("cifar10", "cifar100", "imagenet2012", "cifar10_dvs")


def recipe(args) -> writer.Recipe:
  if args.dataset in cifar.LAYOUTS:
    return cifar.Cifar(args.dataset, args.manual_dir)
  if args.dataset == "imagenet2012":
    return imagenet.ImageNet(args.manual_dir)
  return cifar10_dvs.Cifar10Dvs(args.manual_dir, frames=args.frames, size=args.size)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m ge2mst_jax.prepare", description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dataset", choices=DATASETS)
  p.add_argument("--manual_dir", required=True, help="the downloaded files (docs/data.md lists them)")
  p.add_argument("--data_dir", default="~/tensorflow_datasets",
                 help="where the set is written (the configs' data.data_dir); default tfds' own")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
  p.add_argument("--frames", type=int, default=10, help="cifar10_dvs: frames per recording (default 10)")
  p.add_argument("--size", type=int, default=events.SENSOR, help="cifar10_dvs: frame side, divides 128 (default 128)")
  args = p.parse_args(argv)
  args.manual_dir, args.data_dir = os.path.expanduser(args.manual_dir), os.path.expanduser(args.data_dir)
  r = recipe(args)
  try:
    out = writer.prepare(r, args.data_dir, args.workers)
  except DataError as e:
    sys.exit(f"{p.prog}: {cli.one_line(e)}")
  except KeyboardInterrupt:
    sys.exit(130)   # the writer has said where the finished shards are
  print(f"{r.name} {r.version} is in {out}: train with --config.data.data_dir={args.data_dir}")


if __name__ == "__main__":
  main()
