"""Small raw files in the formats users download, written by the tests (nothing is downloaded):
CIFAR python-version tarballs, ImageNet's manual-dir tars and CIFAR10-DVS `.aedat` recordings."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
from PIL import Image

from tests import jpeg_records


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def cifar_tarball(manual_dir: str, name: str, train: int, test: int, seed: int = 0) -> dict:
  """Writes `cifar-10-python.tar.gz` or `cifar-100-python.tar.gz` in the real layout (py2-style
  pickles with bytes keys, data as [N, 3072] uint8 channel-first rows); train is cut into the
  five batches for CIFAR-10. Returns {'train'|'test': (images NHWC, labels[, coarse labels])}."""
  rng = np.random.default_rng(seed)
  hundred = name == "cifar100"
  classes = 100 if hundred else 10
  out = {}
  for split, n in (("train", train), ("test", test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out[split] = (images, rng.integers(0, classes, n), rng.integers(0, 20, n))
  folder = "cifar-100-python" if hundred else "cifar-10-batches-py"

  def batch(split, a, b):
    images, fine, coarse = out[split]
    d = {b"batch_label": b"batch", b"data": images[a:b].transpose(0, 3, 1, 2).reshape(b - a, -1),
         b"filenames": [b"x.png"] * (b - a)}
    if hundred:
      d.update({b"fine_labels": fine[a:b].tolist(), b"coarse_labels": coarse[a:b].tolist()})
    else:
      d[b"labels"] = fine[a:b].tolist()
    return pickle.dumps(d, protocol=2)

  os.makedirs(manual_dir, exist_ok=True)
  tarball = "cifar-100-python.tar.gz" if hundred else "cifar-10-python.tar.gz"
  with tarfile.open(os.path.join(manual_dir, tarball), "w:gz") as tar:
    if hundred:
      _add(tar, f"{folder}/train", batch("train", 0, train))
      _add(tar, f"{folder}/test", batch("test", 0, test))
      _add(tar, f"{folder}/meta", pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)],
                                                b"coarse_label_names": [b"s%d" % i for i in range(20)]}, protocol=2))
    else:
      bounds = np.linspace(0, train, 6).astype(int)
      for i in range(5):
        _add(tar, f"{folder}/data_batch_{i + 1}", batch("train", bounds[i], bounds[i + 1]))
      _add(tar, f"{folder}/test_batch", batch("test", 0, test))
      _add(tar, f"{folder}/batches.meta", pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2))
  return out


def imagenet_manual_dir(manual_dir: str, per_class: dict[str, int], validation: int, seed: int = 0,
                        cmyk: str | None = None, png: str | None = None) -> dict[str, tuple[str, bytes]]:
  """`ILSVRC2012_img_train.tar` (a tar of `SYNSET.tar`s of `SYNSET_i.JPEG`), `ILSVRC2012_img_val.tar`
  (`ILSVRC2012_val_%08d.JPEG`) and `validation_labels.txt` (the val images' synsets, sorted by
  name). `cmyk`, `png`: training file names (e.g. from tfds' lists) written as a CMYK JPEG and
  as a PNG. Returns {file name: (synset, file bytes)}."""
  rng = np.random.default_rng(seed)
  synsets = sorted(per_class)
  files = {}

  def jpeg(name, synset):
    h, w = (int(v) for v in rng.integers(40, 90, 2))
    img = jpeg_records.synthetic_photo(rng, h, w)
    if name in (cmyk, png):
      buf = io.BytesIO()
      if name == cmyk:
        Image.fromarray(img).convert("CMYK").save(buf, format="JPEG", quality=90)
      else:
        Image.fromarray(img).save(buf, format="PNG")
      data = buf.getvalue()
    else:
      data = jpeg_records.encode_jpeg(img)
    files[name] = (synset, data)
    return data

  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for synset in synsets:
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        names = [n for n in (cmyk, png) if n and n.startswith(synset)]
        names += [f"{synset}_{i}.JPEG" for i in range(per_class[synset] - len(names))]
        for name in names:
          _add(inner, name, jpeg(name, synset))
      _add(outer, f"{synset}.tar", buf.getvalue())
  labels = [synsets[int(i)] for i in rng.integers(0, len(synsets), validation)]
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i in rng.permutation(validation):    # tar order is not name order
      name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
      _add(tar, name, jpeg(name, labels[i]))
  with open(os.path.join(manual_dir, "validation_labels.txt"), "w") as f:
    f.write("\n".join(labels) + "\n")
  return files


def aedat_bytes(x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray) -> bytes:
  """A CIFAR10-DVS recording of events at image column x, row y, polarity p (1 = ON), time t:
  the header lines, then big-endian (address, timestamp) pairs with the DVS128's address bits
  (sensor x = 127 - row in bits 1-7, sensor y = 127 - column in bits 8-14, bit 0 = 1 - p)."""
  addr = ((127 - x.astype(np.uint32)) << 8) | ((127 - y.astype(np.uint32)) << 1) | (1 - p.astype(np.uint32))
  body = np.stack([addr, t.astype(np.uint32)], axis=1).astype(">u4").tobytes()
  return b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# Data format is int32 address, int32 timestamp\r\n" + body


def dvs_recordings(manual_dir: str, identities: list[str], seed: int = 0, zipped: tuple[str, ...] = ()) -> dict:
  """One recording per identity ('airplane/17' -> airplane/cifar10_airplane_17.aedat), with a few
  hundred random events; the classes in `zipped` go into CLASS.zip instead of a folder.
  Returns {identity: {'x', 'y', 'p', 't'}}."""
  import zipfile
  rng = np.random.default_rng(seed)
  out = {}
  for ident in identities:
    c, number = ident.split("/")
    n = int(rng.integers(200, 400))
    ev = {"x": rng.integers(0, 128, n), "y": rng.integers(0, 128, n), "p": rng.integers(0, 2, n),
          "t": np.sort(rng.integers(0, 10 ** 6, n))}
    out[ident] = ev
    name = f"cifar10_{c}_{number}.aedat"
    if c in zipped:
      with zipfile.ZipFile(os.path.join(manual_dir, f"{c}.zip"), "a") as z:
        z.writestr(f"{c}/{name}", aedat_bytes(**ev))
    else:
      os.makedirs(os.path.join(manual_dir, c), exist_ok=True)
      with open(os.path.join(manual_dir, c, name), "wb") as f:
        f.write(aedat_bytes(**ev))
  return out
