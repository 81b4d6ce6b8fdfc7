"""ImageNet preparation throughput: `python -m ge2mst_jax.prepare imagenet2012`'s work on synthetic
JPEGs of ImageNet's typical size, in tfds' manual-dir layout.

  python benchmarks/prepare_imagenet.py                 # 2000 training + 500 validation images
  python benchmarks/prepare_imagenet.py --images 8000 --workers 1,2,4
  python benchmarks/prepare_imagenet.py --smoke         # checks the script runs

The tars are written to a temporary directory first (not timed): `--distinct` photograph-like
JPEGs (quality 90, sides 333..500 px, about 85 KB; ImageNet's average is about 110 KB) repeated over the
images, in class tars of `--images / --classes` each. Each row is one preparation from scratch
with `workers` processes: the index of the tars, the shards and the metadata. `images_per_s_per_core`
is images per CPU-second of this process and its workers (what a host with more cores multiplies);
`imagenet_hours` is the full set (1 281 167 + 50 000 images) at the row's wall-clock rate. The tars
are read from the page cache here: a machine that reads ImageNet's 145 GB from disk may be bound
by the disk instead.
"""
import io
import os
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time

import bench_lib
import numpy as np

from ge2mst_jax.prepare import imagenet, writer
from tests import jpeg_records

FULL = 1_281_167 + 50_000


def cpu_seconds() -> float:
  """CPU seconds of this process and its reaped children (the pool's workers, once it is closed)."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_manual_dir(path: str, images: int, validation: int, classes: int, distinct: int, seed: int = 0) -> int:
  """The two tars and validation_labels.txt; returns the bytes of JPEG written."""
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(distinct):
    h, w = (int(s) for s in rng.integers(333, 501, 2))
    jpegs.append(jpeg_records.encode_jpeg(jpeg_records.synthetic_photo(rng, h, w)))
  from tensorflow_datasets import builder
  synsets = builder("imagenet2012").info.features["label"].names[:classes]
  total, k = 0, 0
  with tarfile.open(os.path.join(path, imagenet.TARS["train"]), "w") as outer:
    for c, synset in enumerate(synsets):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        for i in range(images * (c + 1) // classes - images * c // classes):
          data = jpegs[k % distinct]
          _add(inner, f"{synset}_{i}.JPEG", data)
          total, k = total + len(data), k + 1
      _add(outer, f"{synset}.tar", buf.getvalue())
  with tarfile.open(os.path.join(path, imagenet.TARS["validation"]), "w") as tar:
    for i in range(validation):
      data = jpegs[(k + i) % distinct]
      _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", data)
      total += len(data)
  with open(os.path.join(path, imagenet.LABELS), "w") as f:
    f.write("\n".join(synsets[i % classes] for i in range(validation)) + "\n")
  return total


def commit() -> str:
  r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                     cwd=os.path.dirname(os.path.abspath(__file__)))
  return r.stdout.strip() or "unknown"


def main(argv=None):
  p = bench_lib.arg_parser(__doc__)
  p.add_argument("--images", type=int, default=2000, help="training images (validation: a quarter as many)")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--distinct", type=int, default=64, help="distinct JPEGs, repeated over the images")
  p.add_argument("--workers", default="", help="comma-separated worker counts (default: 1 and every core)")
  p.add_argument("--shard_size", type=int, default=imagenet.SHARD)
  a = p.parse_args(argv)
  if a.smoke:
    a.images, a.classes, a.distinct, a.shard_size = 40, 4, 4, 10
  cores = os.cpu_count() or 1
  counts = [int(w) for w in a.workers.split(",")] if a.workers else sorted({1, cores})
  validation = a.images // 4
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, "manual")
    os.makedirs(manual)
    jpeg_bytes = write_manual_dir(manual, a.images, validation, a.classes, a.distinct)
    n = a.images + validation
    for workers in counts:
      out = os.path.join(tmp, f"out{workers}")
      t, c = time.perf_counter(), cpu_seconds()
      writer.prepare(imagenet.ImageNet(manual, shard_size=a.shard_size), out, workers=workers)
      wall, cpu = time.perf_counter() - t, cpu_seconds() - c
      rows.append({"stage": f"prepare imagenet2012, {workers} worker processes", "workers": workers, "images": n,
                   "wall_s": wall, "cpu_seconds": cpu, "images_per_s": n / wall, "images_per_s_per_core": n / cpu,
                   "mb_per_s": jpeg_bytes / wall / 1e6, "imagenet_hours": FULL / (n / wall) / 3600})
      shutil.rmtree(out)
  path = bench_lib.record("prepare_imagenet", rows, a.smoke, a.out, commit=commit(), jpeg_sides=[333, 500],
                          mean_jpeg_bytes=jpeg_bytes / n, shard_size=a.shard_size)
  bench_lib.print_table(rows, [("workers", "workers", "d"), ("images", "images", "d"), ("wall s", "wall_s", ".1f"),
                               ("img/s", "images_per_s", ".0f"), ("img/s/core", "images_per_s_per_core", ".0f"),
                               ("MB/s", "mb_per_s", ".0f"), ("ImageNet h", "imagenet_hours", ".1f")])
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
