"""Input pipelines: `tfds.data_source` (ArrayRecord, no TensorFlow) or the built-in digits,
through grain: per-process shard -> seeded shuffle -> repeat -> augment -> batch -> prefetch.

The grain iterator is checkpointable, so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np

from ge2mst_jax.data import augment
from ge2mst_jax.io import paths
from ge2mst_jax.data import transforms
from ge2mst_jax.io.errors import DataError


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------
class ArraySource(Sequence):
  """A random-access source over in-memory arrays: records are `{'image', 'label'}` dicts."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


DIGITS_SPLIT = os.path.join(os.path.dirname(__file__), "digits_split.npy")
DIGITS_TRAIN = 1437   # DIGITS_SPLIT holds the train indices, then the 360 test indices


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's copy of the digits (images 1797x8x8 in 0..16, labels), read without importing
  scikit-learn, whose import alone would add seconds to every training process's start-up."""
  spec = importlib.util.find_spec("sklearn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
  if not os.path.exists(path):
    raise DataError(f"The built-in digits data set ships with scikit-learn ({path or 'sklearn'} not found): "
                    f"pip install scikit-learn.")
  data = np.loadtxt(path, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def digits_source(split: str, image_size: int = 32) -> ArraySource:
  """scikit-learn's handwritten digits (1797 8x8 images, 10 classes; ships with the package).

  A fixed stratified split (DIGITS_SPLIT: `train_test_split(test_size=0.2, random_state=0,
  stratify=labels)`, stored in its order, so it does not move with scikit-learn's version);
  images are upsampled to `image_size` (nearest neighbour, so the 8x8 pixels stay sharp), scaled
  to [0, 1] and given 3 channels.
  """
  order = np.load(DIGITS_SPLIT)
  idx = {"train": order[:DIGITS_TRAIN], "test": order[DIGITS_TRAIN:]}.get(split)
  if idx is None:
    raise DataError(f"digits has splits 'train' and 'test', not {split!r}.")
  images, labels = digits_arrays()
  img = (images[idx] / 16.0).astype(np.float32)
  rep = -(-image_size // 8)
  img = np.repeat(np.repeat(img, rep, axis=1), rep, axis=2)[:, :image_size, :image_size]
  img = np.repeat(img[..., None], 3, axis=-1)
  return ArraySource((img * 255).round().astype(np.uint8), labels[idx].astype(np.int32))


# The sets `python -m ge2mst_jax.prepare` makes from the files a user downloads.
PREPARABLE = ("cifar10", "cifar100", "imagenet2012", "cifar10_dvs")


def tfds_source(name: str, split: str, data_dir: str | None, encoded_images: bool = False):
  """`tfds.data_source` over prepared ArrayRecord files, with a clear error when they are missing.

  `encoded_images`: records carry the image feature's encoded bytes (tfds' `SkipDecoding`), for
  the workers to decode themselves; otherwise tfds decodes every image at full size with PIL.
  """
  import tensorflow_datasets as tfds

  if data_dir and paths.is_remote(data_dir):
    # array_record's reader (C++, under tfds.data_source) opens local files only: it fails on
    # gs:// even where epath, gcsfs and tensorstore reach the bucket.
    raise DataError(f"data.data_dir={data_dir}: ArrayRecord files are read from a local path only; mount the "
                    f"bucket (e.g. `gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`) or copy the prepared data to "
                    f"local disk, and pass that directory.")
  try:
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded_images else None
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  except Exception as e:  # tfds raises several types for "not prepared"
    where, base = data_dir or "~/tensorflow_datasets", name.split(":")[0]
    if base not in PREPARABLE and base not in tfds.list_builders(with_community_datasets=False):
      raise DataError(
          f"Unknown data set {name!r}: it is neither 'digits', nor a tfds data set, nor prepared in {where}: "
          f"check data.name (e.g. cifar10, cifar100, imagenet2012) and data.data_dir.") from None
    routes = [f"`python -m ge2mst_jax.prepare {base} --manual_dir=DOWNLOADS --data_dir={where}` (docs/data.md)"
              ] if base in PREPARABLE else []
    if base != "cifar10_dvs":   # the one set tfds has no builder for
      routes.append(f"`tfds build {name} --file_format=array_record --data_dir={where}` on a machine with TensorFlow")
    raise DataError(
        f"Data set {name!r} (split {split!r}) is not prepared as ArrayRecord in {where}: run {', or '.join(routes)}, "
        f"or copy prepared files there, then pass --config.data.data_dir ({type(e).__name__}).") from None


def check_data(cfg) -> None:
  """Opens both splits and reads the augmentation recipe, so that a missing or unknown data set or
  a bad recipe fails before any compile or write."""
  for split in ("train", "test"):
    make_source(cfg, split)
  _preprocess(cfg, True)


def make_source(cfg, split: str):
  if cfg.name == "digits":
    return digits_source(split, cfg.image_size)
  source = tfds_source(cfg.name, cfg[f"{split}_split"], cfg.data_dir or None, encoded_images=cfg.decode_in_workers)
  if cfg.event_frames:
    frames = source.dataset_info.features["image"].shape[0]
    if frames != cfg.event_frames:
      raise DataError(f"Data set {cfg.name!r} in {cfg.data_dir or '~/tensorflow_datasets'} holds {frames} frames per "
                      f"sample, the config {cfg.event_frames}: pass --config.data.event_frames={frames} (the "
                      f"config's frames={frames}), or prepare the set again with --frames {cfg.event_frames} in "
                      f"another --data_dir.")
  return source


# ----------------------------------------------------------------------------
# Transforms (per record, run in grain workers)
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.RandomMap):
  """(Decode) -> (augment) -> resize -> normalise. `train` picks the augmentation policy.

  Records carry decoded uint8 arrays or, where the source skips tfds' decoding
  (`data.decode_in_workers`), the encoded bytes, which the ImageNet policy decodes at its
  crop's scale.
  """
  image_size: int
  train: bool
  policy: str          # 'none' | 'cifar' (pad-crop + flip) | 'imagenet' (RRC + flip + RandAugment + erasing)
  norm: str
  rand_augment: augment.RandAugment | None = None
  random_erasing: augment.RandomErasing | None = None
  event_frames: int = 0

  def random_map(self, rec: dict, rng: np.random.Generator) -> dict[str, Any]:
    label = np.int32(rec["label"])
    if self.event_frames:  # event frames [T, H, W, 2]: counts, resize per frame, no colour ops
      img = np.asarray(rec["image"])
      frames = np.stack([transforms.resize(f, self.image_size) for f in img.astype(np.float32)])
      if self.train and rng.uniform() < 0.5:
        frames = frames[:, :, ::-1]
      return {"image": (frames / max(1.0, frames.max())).astype(np.float32), "label": label}
    if not self.train or self.policy == "none":  # the transform `transforms.eval_transform` gives users
      return {"image": transforms.eval_image(rec["image"], self.image_size, self.policy, self.norm), "label": label}
    if self.policy == "imagenet":
      img = rec["image"]
      img = img if isinstance(img, (bytes, np.bytes_)) else transforms.to_rgb(np.asarray(img))
      pil = augment.random_flip(augment.random_resized_crop(img, self.image_size, rng), rng)
      if self.rand_augment is not None:
        pil = self.rand_augment(pil, rng)
      x = transforms.normalize(np.asarray(pil), self.norm)
      if self.random_erasing is not None:   # after normalisation, as timm: the noise is N(0, 1) there
        x = self.random_erasing(x, rng)
      return {"image": x, "label": label}
    if self.policy == "cifar":
      img = transforms.resize(transforms.to_rgb(transforms.decode_image(rec["image"])), self.image_size)
      img = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
      y, x = rng.integers(0, 9, size=2)
      img = img[y:y + self.image_size, x:x + self.image_size]
      img = img[:, ::-1] if rng.uniform() < 0.5 else img
      return {"image": transforms.normalize(img, self.norm), "label": label}
    raise ValueError(f"Unknown augmentation policy {self.policy!r}: use 'none', 'cifar' or 'imagenet'.")


# ----------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------
def process_shard(n: int) -> slice:
  """This process's contiguous, equal-sized share of n records (multi-host data parallelism)."""
  per = n // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise DataError(f"Batch size {global_batch} is not divisible by the {jax.process_count()} processes.")
  return global_batch // jax.process_count()


def _preprocess(cfg, train: bool) -> Preprocess:
  ra, erasing = cfg.randaugment, cfg.random_erasing
  if (ra or erasing) and cfg.augment != "imagenet":
    raise ValueError(f"data.randaugment={ra!r} / data.random_erasing={erasing} belong to the 'imagenet' policy "
                     f"(data.augment={cfg.augment!r}): set data.augment='imagenet' or clear them.")
  # timm's fill: the data set's mean colour, what a normalised image has at 0
  ra = augment.parse_rand_augment(ra, fill=augment.mean_fill(transforms.MEAN[cfg.norm])) if ra else None
  return Preprocess(cfg.image_size, train, cfg.augment if train else cfg.eval_policy, cfg.norm, ra,
                    augment.RandomErasing(erasing, cfg.random_erasing_mode) if erasing else None,
                    cfg.event_frames)


def train_dataset(cfg, global_batch: int, seed: int, source: Sequence | None = None,
                  start: int = 0) -> grain.IterDataset:
  """Infinite, shuffled (per epoch, seeded), augmented, batched stream of this process's shard
  of `source` (default: the config's training split), from its `start`-th record.

  The stream is a pure function of (seed, process count, process index, start): a run
  resumes by rebuilding it at the position saved with its checkpoint (`resume_records`).
  """
  source = make_source(cfg, "train") if source is None else source
  ds = grain.MapDataset.source(source)[process_shard(len(source))]
  # random_map before the slice: each record's augmentation is seeded by its index in the
  # repeated stream, so a stream started at `start` sees exactly what an uninterrupted one did.
  ds = ds.seed(seed).shuffle().repeat(None).random_map(_preprocess(cfg, True))[start:]
  ds = ds.batch(local_batch_size(global_batch), drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4))
  return _multiprocess(it, cfg.workers)


def _multiprocess(it: grain.IterDataset, workers: int) -> grain.IterDataset:
  """`it` computed by `workers` processes (0: in this one), in the same order."""
  if workers <= 0:
    return it
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller has parsed none
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def data_position(records: int, num_records: int) -> dict:
  """What a checkpoint stores of the input stream: records read by each process, and the sharding."""
  shard = num_records // jax.process_count()
  return {"records_per_process": int(records), "process_count": jax.process_count(), "shard_size": shard,
          "epoch": records // max(shard, 1), "examples_seen": int(records) * jax.process_count()}


def resume_records(saved: dict | None, num_records: int, fallback_records: int) -> int:
  """This process's start record for a run resumed from a saved `data_position`.

  With the same process count it is the saved count: the stream continues exactly. With
  another count, each process keeps the saved global epoch and the saved number of examples
  seen within it (rounded down to whole records per process); which examples remain in that
  epoch is approximate, since every host shuffles its own shard and the shards are now cut
  differently. Checkpoints without a position resume at `fallback_records` (step x batch).
  """
  if not saved:
    return fallback_records
  if saved["process_count"] == jax.process_count():
    return int(saved["records_per_process"])
  epoch, offset = divmod(int(saved["records_per_process"]), max(int(saved["shard_size"]), 1))
  shard = num_records // jax.process_count()
  return epoch * shard + offset * int(saved["process_count"]) // jax.process_count()


def eval_batch_shape(global_batch: int, num_devices: int) -> int:
  """The global eval batch actually used: `global_batch` rounded up to a multiple of the device
  count (so any eval batch size works on any slice); the padding is masked out."""
  return -(-global_batch // num_devices) * num_devices


@dataclasses.dataclass(frozen=True)
class _EvalRecord(grain.transforms.Map):
  """Position j of this process's padded share -> its transformed record, or a masked blank
  beyond the share's end (`blank`: the image shape; zeros are made per record, cheaply)."""
  source: Sequence
  prep: Preprocess
  start: int
  stop: int
  blank: tuple

  def map(self, j: int) -> dict[str, Any]:
    i = self.start + int(j)
    if i >= self.stop:
      return {"image": np.zeros(self.blank, np.float32), "label": np.int32(0), "mask": np.bool_(False)}
    rec = self.prep.random_map(self.source[i], _EVAL_RNG)   # deterministic: the generator is unused
    return {**rec, "mask": np.bool_(True)}


_EVAL_RNG = np.random.default_rng(0)


def eval_dataset(cfg, global_batch: int, num_devices: int | None = None) -> grain.IterDataset:
  """One pass over the test split, this process's share, in equal-count padded batches, in order.

  Every process yields the same number of batches (multi-host steps stay in lockstep);
  `mask` marks real examples. The batch is padded up to a multiple of `num_devices`. Records
  are read and transformed ahead by `read_threads` threads (and `workers` processes if set).
  """
  source = make_source(cfg, "test")
  n = len(source)
  per = -(-n // jax.process_count())
  start = jax.process_index() * per
  bs = local_batch_size(eval_batch_shape(global_batch, num_devices or jax.device_count()))
  prep = _preprocess(cfg, False)
  blank = prep.random_map(source[0], _EVAL_RNG)["image"].shape
  # `per` rounded up to whole batches: the last process's share may also run past the data set.
  ds = grain.MapDataset.range(-(-per // bs) * bs).map(_EvalRecord(source, prep, start, min(start + per, n), blank))
  ds = ds.batch(bs)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 1),
                                            prefetch_buffer_size=2 * bs))
  return _multiprocess(it, cfg.workers)


def eval_batches(cfg, global_batch: int, num_devices: int | None = None):
  """An iterator over `eval_dataset`'s batches: {'image', 'label', 'mask'} numpy arrays."""
  return iter(eval_dataset(cfg, global_batch, num_devices))


def num_examples(cfg, split: str) -> int:
  return len(make_source(cfg, split))
