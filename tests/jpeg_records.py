"""A small tfds data set of generated JPEGs in ImageNet's feature layout, prepared as ArrayRecord
with tfds' own writer: what the tests and the input benchmark read through `tfds.data_source`
exactly as `imagenet2012` is read.

  from tests import jpeg_records
  jpeg_records.build("/tmp/tfds", train=64, validation=32, size_range=(60, 120))
  # then: config.data.name = jpeg_records.NAME, config.data.data_dir = "/tmp/tfds"

The image feature is handed already-encoded JPEG bytes (PIL), so preparing needs no TensorFlow
(given numpy pixels, tfds encodes them with TensorFlow). Images are smooth random colour fields
with hard edges and grain, so that they cost about what a photograph costs to decode: about 90 KB
at 375x500 and quality 90 (3.9 bits a pixel; ImageNet's training JPEGs average about 110 KB,
138 GB over 1.28 M images).
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "ge2mst_jpeg_images"
NUM_CLASSES = 10


def synthetic_photo(rng: np.random.Generator, height: int, width: int, grain: float = 16.0) -> np.ndarray:
  """An HxWx3 uint8 image with photograph-like structure: a smooth colour field, a few hard-edged
  shapes and grain of standard deviation `grain` (which sets the JPEG's size and decoding cost)."""
  coarse = rng.uniform(0, 255, (max(height // 32, 2), max(width // 32, 2), 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
  yy, xx = np.mgrid[:height, :width]
  for _ in range(rng.integers(2, 6)):   # discs: sharp edges, as objects have
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.3) * min(height, width)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
  img += rng.normal(0, grain, img.shape)    # sensor grain: the high-frequency content a JPEG must keep
  return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


class GeneratedJpegs(tfds.core.GeneratorBasedBuilder):
  """ImageNet's layout (`image` JPEG, `label`, `file_name`), splits 'train' and 'validation'.

  What is generated (counts, size range, quality, seed) is given to the constructor; reading
  needs none of it (tfds reads the prepared files' own metadata).
  """
  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there are no checksums beside the code to look up; tfds' lookup of
  # the code's directory needs `importlib_resources`, which tfds does not install on Python >= 3.9.
  code_path = None

  def __init__(self, *, examples: dict[str, int] | None = None, size_range=(60, 120), quality: int = 90,
               seed: int = 0, **kwargs):
    self._examples = examples or {"train": 48, "validation": 24}
    self._size_range, self._quality, self._seed = tuple(size_range), quality, seed
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in self._examples.items()}

  def _generate_examples(self, split: str, n: int):
    rng = np.random.default_rng([self._seed, sorted(self._examples).index(split)])
    lo, hi = self._size_range
    for i in range(n):
      h, w = rng.integers(lo, hi + 1, size=2)
      name = f"{split}_{i:06d}.JPEG"
      yield name, {"image": encode_jpeg(synthetic_photo(rng, int(h), int(w)), self._quality),
                   "label": int(rng.integers(NUM_CLASSES)), "file_name": name}


def build(data_dir: str, train: int = 48, validation: int = 24, size_range=(60, 120), quality: int = 90,
          seed: int = 0) -> str:
  """Prepares the data set as ArrayRecord under `data_dir` (no TensorFlow); returns its name."""
  builder = GeneratedJpegs(data_dir=data_dir, examples={"train": train, "validation": validation},
                           size_range=size_range, quality=quality, seed=seed)
  builder.download_and_prepare(file_format="array_record")
  return NAME
