"""ImageNet-1k (ILSVRC2012) from tfds' manual-dir layout, as tfds' `imagenet2012` 5.1.0: features
`image` (the JPEG bytes as they are), `label` (1000 synsets), `file_name`; splits 'train' (from
`ILSVRC2012_img_train.tar`, a tar of one tar per synset), 'validation' (`ILSVRC2012_img_val.tar`)
and, where its tar is there, 'test' (label -1).

The validation images' labels are tfds' list (`validation_labels.txt`, one synset a line, in the
order of the sorted file names), or a file of that name in the manual dir. The CMYK JPEGs and the
PNG named .JPEG that tfds lists are re-encoded as RGB JPEG at quality 100, as tfds does.

Preparing starts with an index of every image's place in the tars (headers only, kept until the set
is finished); workers then read each shard's images straight from the tars by offset. The
training images are spread over the shards in a fixed random order (tfds too shuffles its
shards), so that any contiguous part of the split, as one host of many reads, holds every class.
"""
from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
from etils import epath

from ge2mst_jax.io.errors import DataError
from ge2mst_jax.prepare import writer

TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar", "test": "ILSVRC2012_img_test.tar"}
LABELS = "validation_labels.txt"
SHARD = 1250        # images a shard: about 140 MB of JPEGs, 1025 training shards
INDEX = "index.npz"
SEED = 0            # the training images' order over the shards


def _members(path: epath.Path, tar_file, size: int) -> list[tarfile.TarInfo]:
  """The regular files of the tar open in `tar_file` at its current position (headers only)."""
  try:
    with tarfile.open(fileobj=tar_file, mode="r:") as tar:
      members = [m for m in tar if m.isfile()]
  except (tarfile.TarError, EOFError) as e:
    raise DataError(f"{path} is not a readable tar ({e}): download it again.") from None
  if members and members[-1].offset_data + members[-1].size > size:
    raise DataError(f"{path} is truncated (its last file, {members[-1].name}, ends past the end of the file): "
                    f"download it again.")
  return members


def index_split(manual_dir: epath.Path, split: str, synsets: list[str]) -> dict[str, np.ndarray]:
  """{'name', 'label', 'offset', 'size'} of every image of `split`, sorted by file name."""
  path = manual_dir / TARS[split]
  size = path.stat().length
  with path.open("rb") as f, path.open("rb") as inner:
    members = _members(path, f, size)
    if split != "train":
      rows = [(m.name, -1, m.offset_data, m.size) for m in members]
    else:
      rows, bar = [], writer.progress(len(members), f"indexing {TARS[split]}", unit="class tars")
      for m in members:
        synset = m.name[:-4]
        if not m.name.endswith(".tar") or synset not in synsets:
          raise DataError(f"{path} holds {m.name}, which is not a synset's tar (n########.tar): it is not "
                          f"{TARS['train']}; download that file.")
        inner.seek(m.offset_data)
        label = synsets.index(synset)
        rows += [(i.name, label, i.offset_data, i.size) for i in _members(path, inner, m.offset_data + m.size)]
        bar.update(1)
      bar.close()
  if not rows:
    raise DataError(f"{path} holds no images: download {TARS[split]} again.")
  rows.sort()
  names, labels, offsets, sizes = zip(*rows)
  index = {"name": np.asarray(names), "label": np.asarray(labels, np.int64),
           "offset": np.asarray(offsets, np.int64), "size": np.asarray(sizes, np.int64)}
  if split == "validation":
    index["label"] = _validation_labels(manual_dir, names, synsets)
  return index


def _validation_labels(manual_dir: epath.Path, names, synsets: list[str]) -> np.ndarray:
  own = manual_dir / LABELS
  if own.exists():
    path = own
  else:
    import tensorflow_datasets as tfds
    path = epath.Path(tfds.core.tfds_path(f"datasets/imagenet2012/{LABELS}"))
  lines = path.read_text().split()
  if len(lines) != len(names):
    raise DataError(f"{path} has {len(lines)} labels for the {len(names)} images of {TARS['validation']}: "
                    f"put the validation tar as distributed (50 000 images) in the manual dir, or a {LABELS} "
                    f"with one synset per image (sorted by file name) beside it.")
  unknown = sorted(set(lines) - set(synsets))
  if unknown:
    raise DataError(f"{path}: {unknown[0]} is not an ImageNet-1k synset: give one synset (n########) a line.")
  lookup = {s: i for i, s in enumerate(synsets)}
  return np.asarray([lookup[s] for s in lines], np.int64)


def fix_image(name: str, data: bytes, path) -> bytes:
  """tfds' fixes: its listed CMYK JPEGs and its PNG file become RGB JPEGs (quality 100); any
  other file must be a JPEG."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as official
  if name in official.CMYK_IMAGES or name in official.PNG_IMAGES:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
      buf = io.BytesIO()
      im.convert("RGB").save(buf, format="JPEG", quality=100)
      return buf.getvalue()
  if not data.startswith(b"\xff\xd8"):
    raise DataError(f"{path}: {name} is not a JPEG: download the tar again.")
  return data


@dataclasses.dataclass
class ImageNet(writer.OfficialRecipe):
  manual_dir: str
  shard_size: int = SHARD
  name: str = "imagenet2012"
  version: str = "5.1.0"
  names: dict = dataclasses.field(default_factory=dict)   # none to set: the builder lists the synsets

  def splits(self) -> list[str]:
    manual = epath.Path(self.manual_dir)
    writer.sources_exist([manual / TARS["train"], manual / TARS["validation"]], "ImageNet's tars")
    return [s for s in TARS if (manual / TARS[s]).exists()]

  def plan(self, scratch: epath.Path) -> list[writer.Shard]:
    manual = epath.Path(self.manual_dir)
    splits = self.splits()          # also on a rerun: the tars must still be there
    index_file = scratch / INDEX
    if index_file.exists():
      with index_file.open("rb") as f:
        flat = dict(np.load(f))
    else:
      synsets = self.features()["label"].names
      flat = {}
      for split in splits:
        flat.update({f"{split}/{k}": v for k, v in index_split(manual, split, synsets).items()})
      tmp = scratch / (INDEX + ".tmp")
      with tmp.open("wb") as f:
        np.savez(f, **flat)
      tmp.replace(index_file)
    shards = []
    for split in dict.fromkeys(k.split("/")[0] for k in flat):
      cols = {k.split("/")[1]: v for k, v in flat.items() if k.startswith(split + "/")}
      n = len(cols["name"])
      order = np.random.default_rng(SEED).permutation(n) if split == "train" else np.arange(n)
      parts = writer.split_evenly(list(order), -(-n // self.shard_size))
      for i, part in enumerate(parts):
        shards.append(writer.Shard(split, i, len(parts), len(part),
                                   (str(manual / TARS[split]), {k: v[part] for k, v in cols.items()})))
    return shards

  def examples(self, payload):
    path, cols = payload
    with epath.Path(path).open("rb") as f:
      for name, label, offset, size in zip(cols["name"], cols["label"], cols["offset"], cols["size"]):
        f.seek(int(offset))
        data = f.read(int(size))
        if len(data) != size:
          raise DataError(f"{path} is truncated in {name}: download it again.")
        name = str(name)
        yield name, {"image": fix_image(name, data, path), "label": int(label), "file_name": name}
