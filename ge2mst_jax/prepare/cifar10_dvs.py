"""CIFAR10-DVS (Li et al. 2017) from its distributed recordings, as event frames with a fixed split.

The manual dir holds, per class, the class's folder of `.aedat` recordings (`airplane/...`) or
the zip it is distributed as (`airplane.zip`); a recording is named by its number at the end of
its file name (`cifar10_airplane_17.aedat` is `airplane/17`), 0 to 999 in each class.

The set has features `image` ([frames, size, size, 2] uint16 event counts, OFF then ON, zlib-
compressed), `label` and `file_name` (`airplane/17`), and splits 'train' (9 000) and 'test'
(1 000): the fixed stratified 9:1 split in `cifar10_dvs_split.npy` (`make_split(SEED)`: 100 test
recordings a class, drawn with a seeded generator and stored as identities, so every user scores
on the same test recordings, whatever their file system lists first). The frame count, size and
split are the set's metadata.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import zipfile

import numpy as np
from etils import epath

from ge2mst_jax.io.errors import DataError
from ge2mst_jax.prepare import events, writer

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS, TEST_PER_CLASS = 1000, 100
SEED = 0
SPLIT_FILE = os.path.join(os.path.dirname(__file__), "cifar10_dvs_split.npy")
SHARD = 500
_NUMBER = re.compile(r"_(\d+)\.aedat$")


def make_split(seed: int = SEED) -> np.ndarray:
  """The 10 000 identities: the 9 000 training ones, then the 1 000 test ones (100 a class,
  uniformly drawn per class), each part in class then number order."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in CLASSES:
    perm = rng.permutation(PER_CLASS)
    test += [f"{c}/{i}" for i in sorted(perm[:TEST_PER_CLASS])]
    train += [f"{c}/{i}" for i in sorted(perm[TEST_PER_CLASS:])]
  return np.asarray(train + test, dtype="S")


def stored_split() -> dict[str, list[str]]:
  """The package's split: {'train': identities, 'test': identities}."""
  order = [i.decode() for i in np.load(SPLIT_FILE).tolist()]   # stored as ASCII bytes
  return {"train": order[:-len(CLASSES) * TEST_PER_CLASS], "test": order[-len(CLASSES) * TEST_PER_CLASS:]}


def find_recordings(manual_dir: epath.Path, classes=CLASSES) -> dict[str, tuple[str, str]]:
  """{identity: (container, member)}: a file in a class folder is (path, ''), a zip member (zip, name)."""
  found = {}
  for c in classes:
    folder, archive = manual_dir / c, manual_dir / f"{c}.zip"
    if folder.is_dir():
      names = [(str(p), "", p.name) for p in folder.iterdir()]
    elif archive.exists():
      try:
        with zipfile.ZipFile(archive) as z:
          names = [(str(archive), n, n.rsplit("/", 1)[-1]) for n in z.namelist()]
      except zipfile.BadZipFile:
        raise DataError(f"{archive} is not a readable zip: download it again.") from None
    else:
      raise DataError(f"Neither {folder}/ nor {archive} exists: put CIFAR10-DVS's {c}.zip (or its extracted "
                      f"folder) in the manual dir.")
    for container, member, base in names:
      if m := _NUMBER.search(base):
        found[f"{c}/{int(m.group(1))}"] = (container, member)
  return found


@functools.lru_cache(maxsize=len(CLASSES))
def _zip(path: str) -> zipfile.ZipFile:
  """A class zip, opened once per worker: its directory lists a thousand members."""
  return zipfile.ZipFile(path)


def read_recording(container: str, member: str) -> bytes:
  if member:
    return _zip(container).read(member)
  return epath.Path(container).read_bytes()


@dataclasses.dataclass
class Cifar10Dvs(writer.Recipe):
  manual_dir: str
  frames: int = 10
  size: int = events.SENSOR
  split: dict | None = None        # {split: identities}; default the stored split
  shard_size: int = SHARD
  name: str = "cifar10_dvs"
  version: str = "1.0.0"

  def identities(self) -> dict[str, list[str]]:
    return self.split or stored_split()

  def options(self) -> dict:
    ids = self.identities()
    digest = hashlib.sha256("\n".join(ids["train"] + ["|"] + ids["test"]).encode()).hexdigest()[:16]
    return {"frames": self.frames, "size": self.size, "split_by": "number", "split_sha256": digest,
            "split_sizes": {k: len(v) for k, v in ids.items()}}

  def features(self):
    import tensorflow_datasets as tfds
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(self.frames, self.size, self.size, 2), dtype=np.uint16,
                                      encoding=tfds.features.Encoding.ZLIB),
        "label": tfds.features.ClassLabel(names=CLASSES),
        "file_name": tfds.features.Text(),
    })

  def info(self, features, data_dir):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, file_adapters, utils
    identity = dataset_info.DatasetIdentity(name=self.name, version=utils.Version(self.version), data_dir="",
                                            module_name="ge2mst_jax.prepare.cifar10_dvs")
    info = tfds.core.DatasetInfo(
        builder=identity, features=features, supervised_keys=("image", "label"),
        description=(f"CIFAR10-DVS event recordings as {self.frames} frames of {self.size}x{self.size} event "
                     f"counts per polarity (OFF, ON), split by number of events; the fixed stratified 9:1 "
                     f"split of ge2mst_jax (cifar10_dvs_split.npy)."),
        homepage="https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671",
        metadata=tfds.core.MetadataDict(self.options()))
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    return info

  def plan(self, scratch: epath.Path) -> list[writer.Shard]:
    if self.frames < 1:
      raise DataError(f"--frames {self.frames}: give at least 1 frame.")
    if events.SENSOR % self.size:
      raise DataError(f"--size {self.size} does not divide the sensor's {events.SENSOR} pixels: use 128, 64, 32 or 16.")
    ids = self.identities()
    manual = epath.Path(self.manual_dir)
    if not manual.is_dir():
      raise DataError(f"--manual_dir {manual} is not a directory: pass the folder holding CIFAR10-DVS's class zips.")
    classes = sorted({i.split("/")[0] for v in ids.values() for i in v}, key=CLASSES.index)
    found = find_recordings(manual, classes)
    wanted = [i for v in ids.values() for i in v]
    missing = [i for i in wanted if i not in found]
    if missing:
      raise DataError(f"{len(missing)} of the {len(wanted)} CIFAR10-DVS recordings are missing from {manual} "
                      f"(the first: {missing[0]}, a file ending _{missing[0].split('/')[1]}.aedat): give all ten "
                      f"classes as distributed.")
    shards = []
    for split, names in ids.items():
      order = np.random.default_rng(SEED).permutation(len(names)) if split == "train" else range(len(names))
      parts = writer.split_evenly([names[k] for k in order], -(-len(names) // self.shard_size))
      for i, part in enumerate(parts):
        shards.append(writer.Shard(split, i, len(parts), len(part), [(n, found[n]) for n in part]))
    return shards

  def examples(self, payload):
    for identity, (container, member) in payload:
      where = f"{container}:{member}" if member else container
      frames = events.integrate(events.parse_aedat(read_recording(container, member), where), self.frames,
                                self.size, where)
      yield identity, {"image": frames, "label": CLASSES.index(identity.split("/")[0]), "file_name": identity}
