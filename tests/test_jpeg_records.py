"""A real tfds ArrayRecord data set of JPEGs, built by tfds' own writer without TensorFlow and
read through `tfds.data_source` exactly as ImageNet is: the workers get the encoded bytes and
decode them; the evaluation pipeline pads, masks and keeps the order."""
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import imagenet2012
from ge2mst_jax.data import pipeline as data_lib
from tests import jpeg_records
from ge2mst_jax.data import transforms


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  assert jpeg_records.build(str(d), train=40, validation=21, size_range=(60, 120)) == jpeg_records.NAME
  return str(d)


def imagenet_cfg(data_dir, size=32):
  """The ImageNet config (its policy, recipe and decoding in the workers) over the generated set."""
  cfg = imagenet2012.get_config("small").data
  cfg.name, cfg.data_dir, cfg.image_size, cfg.workers = jpeg_records.NAME, data_dir, size, 0
  return cfg


def test_built_without_tensorflow_and_read_as_imagenet_is(jpeg_dir):
  assert "tensorflow" not in sys.modules
  encoded = data_lib.make_source(imagenet_cfg(jpeg_dir), "train")
  decoded = tfds.data_source(jpeg_records.NAME, split="train", data_dir=jpeg_dir, download=False)
  assert len(encoded) == 40 and len(data_lib.make_source(imagenet_cfg(jpeg_dir), "test")) == 21
  sizes = set()
  for i in (0, 7, 39):
    rec = encoded[i]
    assert isinstance(rec["image"], bytes) and rec["image"][:2] == b"\xff\xd8"      # a JPEG, undecoded
    np.testing.assert_array_equal(transforms.decode_image(rec["image"]), decoded[i]["image"])
    assert rec["label"] == decoded[i]["label"] < jpeg_records.NUM_CLASSES
    sizes.add(decoded[i]["image"].shape)
  assert len(sizes) == 3 and all(60 <= h <= 120 and 60 <= w <= 120 and c == 3 for h, w, c in sizes)
  assert "tensorflow" not in sys.modules


def test_train_pipeline_decodes_and_augments_jpeg_bytes_deterministically(jpeg_dir):
  cfg = imagenet_cfg(jpeg_dir)
  a = next(iter(data_lib.train_dataset(cfg, 8, seed=0)))
  b = next(iter(data_lib.train_dataset(cfg, 8, seed=0)))
  c = next(iter(data_lib.train_dataset(cfg, 8, seed=1)))
  assert a["image"].shape == (8, 32, 32, 3) and a["image"].dtype == np.float32 and a["label"].shape == (8,)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  assert np.isfinite(a["image"]).all() and abs(float(a["image"].mean())) < 3


def test_eval_pipeline_is_the_records_in_order_padded_and_masked(jpeg_dir):
  cfg = imagenet_cfg(jpeg_dir)
  source = data_lib.make_source(cfg, "test")
  batches = list(data_lib.eval_batches(cfg, 8, num_devices=1))
  assert [b["image"].shape[0] for b in batches] == [8, 8, 8] and [int(b["mask"].sum()) for b in batches] == [8, 8, 5]
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  want = np.stack([transforms.eval_image(source[i]["image"], 32, "imagenet", "imagenet") for i in range(21)])
  np.testing.assert_array_equal(images[:21], want)
  np.testing.assert_array_equal(labels[:21], [source[i]["label"] for i in range(21)])
  assert (images[21:] == 0).all() and (labels[21:] == 0).all()
  # the transform users get for raw uint8 images is what the pipeline did to the bytes
  for i in (0, 20):
    raw = transforms.decode_image(source[i]["image"])[None]
    np.testing.assert_array_equal(transforms.eval_transform(cfg)(raw)[0], images[i])


def test_eval_batches_are_the_same_from_worker_processes(jpeg_dir):
  cfg = imagenet_cfg(jpeg_dir)
  local = list(data_lib.eval_batches(cfg, 8, num_devices=1))
  cfg.workers = 1      # the data source and the transform travel to a spawned process
  remote = list(data_lib.eval_batches(cfg, 8, num_devices=1))
  assert len(local) == len(remote) == 3
  for x, y in zip(local, remote):
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(x[k], y[k])


def test_unprepared_or_unknown_data_set_is_a_one_line_error(tmp_path):
  cfg = imagenet_cfg(str(tmp_path))
  with pytest.raises(data_lib.DataError, match=rf"^Data set '{jpeg_records.NAME}' \(split 'train'\) is not prepared "
                                               r"as ArrayRecord in .*: run `tfds build"):
    data_lib.check_data(cfg)
  cfg = imagenet_cfg(jpeg_records.NAME)
  cfg.randaugment = "rand-m9-x1"
  with pytest.raises(ValueError, match=r"unknown section 'x1'"):
    data_lib._preprocess(cfg, True)
