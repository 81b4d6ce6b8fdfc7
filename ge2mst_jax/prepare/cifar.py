"""CIFAR-10 and CIFAR-100 from the python-version tarballs (`cifar-10-python.tar.gz`,
`cifar-100-python.tar.gz`), as tfds' `cifar10` / `cifar100` 3.0.2: features `id` ('train_00000'
in the files' order), `image` (32x32x3 PNG), `label` (and `coarse_label` for CIFAR-100), splits
'train' (50 000) and 'test' (10 000), label names from the tarball's meta file.

The pickles are read by an unpickler that builds only dicts, lists, strings and numpy arrays:
a pickle can run code, and these are files from the internet.
"""
from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile

import numpy as np
from etils import epath

from ge2mst_jax.io.errors import DataError
from ge2mst_jax.prepare import writer

SHARD = 10_000      # examples a shard


@dataclasses.dataclass(frozen=True)
class Layout:
  tarball: str
  folder: str
  train: tuple[str, ...]
  test: str
  meta: str
  labels: dict       # feature name -> (key in the batches, key of the names in meta)


LAYOUTS = {
    "cifar10": Layout("cifar-10-python.tar.gz", "cifar-10-batches-py",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                      {"label": (b"labels", b"label_names")}),
    "cifar100": Layout("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta",
                       {"label": (b"fine_labels", b"fine_label_names"),
                        "coarse_label": (b"coarse_labels", b"coarse_label_names")}),
}


class _ArraysOnly(pickle.Unpickler):
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
             ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR pickle")
    return super().find_class(module, name)


def read_tarball(path: epath.Path, layout: Layout) -> dict[str, dict]:
  """{member: unpickled dict} of the tarball's batches and meta file; one-line errors for a
  truncated archive, a missing member or a file that is not CIFAR's."""
  wanted = {f"{layout.folder}/{m}" for m in (*layout.train, layout.test, layout.meta)}
  found = {}
  try:
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:gz") as tar:
      for member in tar:
        if member.name in wanted:
          found[member.name.rsplit("/", 1)[1]] = _ArraysOnly(tar.extractfile(member), encoding="bytes").load()
  except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
    raise DataError(f"{path} is not a complete CIFAR python-version tarball ({type(e).__name__}: {e}): "
                    f"download {layout.tarball} again.") from None
  missing = sorted(w for w in wanted if w.rsplit("/", 1)[1] not in found)
  if missing:
    raise DataError(f"{path} lacks {missing[0]}: it is not {layout.tarball} (the python version of the data set); "
                    f"download that file.")
  return found


@dataclasses.dataclass
class Cifar(writer.OfficialRecipe):
  name: str
  manual_dir: str
  shard_size: int = SHARD
  version: str = "3.0.2"
  names: dict = dataclasses.field(default_factory=dict)   # feature -> class names, read by `plan`

  @property
  def layout(self) -> Layout:
    return LAYOUTS[self.name]

  def plan(self, scratch: epath.Path) -> list[writer.Shard]:
    path = epath.Path(self.manual_dir) / self.layout.tarball
    writer.sources_exist([path], f"{self.layout.tarball} (CIFAR's python version)")
    batches = read_tarball(path, self.layout)
    meta = batches[self.layout.meta]
    self.names = {f: [n.decode() for n in meta[k]] for f, (_, k) in self.layout.labels.items()}
    shards = []
    for split, members in (("train", self.layout.train), ("test", (self.layout.test,))):
      images = np.concatenate([self._images(batches[m], path, m) for m in members])
      labels = {f: np.concatenate([np.asarray(batches[m][k], np.int64) for m in members])
                for f, (k, _) in self.layout.labels.items()}
      if any(len(v) != len(images) for v in labels.values()):
        raise DataError(f"{path}: the {split} batches hold {len(images)} images but not as many labels: "
                        f"download the tarball again.")
      starts = range(0, len(images), self.shard_size)
      for i, a in enumerate(starts):
        b = a + self.shard_size
        shards.append(writer.Shard(split, i, len(starts), len(images[a:b]),
                                   (split, a, images[a:b], {f: v[a:b] for f, v in labels.items()})))
    return shards

  @staticmethod
  def _images(batch: dict, path, member) -> np.ndarray:
    data = np.asarray(batch.get(b"data", ()))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
      raise DataError(f"{path}: {member} holds no 32x32 RGB images (data of shape {data.shape}, {data.dtype}): "
                      f"download the tarball again.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

  def examples(self, payload):
    from PIL import Image
    split, start, images, labels = payload
    for j, img in enumerate(images):
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="PNG")
      i = start + j
      yield i, {"id": f"{split}_{i:05d}", "image": buf.getvalue(), **{f: int(v[j]) for f, v in labels.items()}}
