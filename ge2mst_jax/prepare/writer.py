"""Writes a tfds ArrayRecord data set shard by shard, with tfds' own serializer, file adapter and
metadata, and no TensorFlow; resumable, in parallel over the host's cores.

A data set is a `Recipe`: its features, its tfds metadata, the options that make it (frame count,
...) and a plan of shards, each a picklable payload that a worker turns into examples. Shards are
written into `DATA_DIR/NAME/incomplete.VERSION/`, each to a temporary name first and renamed
when whole, so an interrupted run leaves only finished shards and a rerun writes the missing
ones. The metadata (`dataset_info.json`) is written last and the directory renamed to
`DATA_DIR/NAME/VERSION` only then: tfds reads a set only where that file is, so a partial output
is never read as a finished set.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
from typing import Any, Iterable, Iterator

from etils import epath

from ge2mst_jax.io.errors import DataError

RECORD = "prepare.json"   # beside the shards: what made them (options), so a rerun can tell
INCOMPLETE = "incomplete."
SCRATCH = "scratch"       # a recipe's files for a rerun (an index), removed when the set is finished


@dataclasses.dataclass(frozen=True)
class Shard:
  split: str
  index: int
  num_shards: int
  examples: int
  payload: Any


class Recipe:
  """What a data set defines; subclasses are picklable (workers receive them)."""
  name: str
  version: str

  def features(self):
    """The `tfds.features.FeaturesDict`."""
    raise NotImplementedError

  def info(self, features, data_dir: epath.Path):
    """The `tfds.core.DatasetInfo` to write (splits are added here); `data_dir` holds no set of
    this name and version yet (an official builder's info is read from there if it does)."""
    raise NotImplementedError

  def options(self) -> dict:
    """What makes this set differ from another of the same name and version."""
    return {}

  def plan(self, scratch: epath.Path) -> list[Shard]:
    """Every shard of every split; may keep files in `scratch` (it exists) to be quick on a rerun."""
    raise NotImplementedError

  def examples(self, payload) -> Iterator[tuple[Any, dict]]:
    """(key, example) pairs of one shard, in order (run in a worker)."""
    raise NotImplementedError


class OfficialRecipe(Recipe):
  """A set tfds has a builder for: features and metadata are the builder's, so the two are
  interchangeable."""
  names: dict      # feature -> class names known only from the downloaded files ({} if none)

  def _builder(self, data_dir=None):
    import tensorflow_datasets as tfds
    return tfds.builder(self.name, data_dir=data_dir, file_format="array_record")

  def features(self):
    return self._builder().info.features

  def info(self, features, data_dir: epath.Path):
    info = self._builder(data_dir).info
    for feature, names in self.names.items():
      info.features[feature].names = names
    return info


def split_evenly(items: list, num_shards: int) -> list[list]:
  """`items` cut into `num_shards` consecutive runs whose lengths differ by at most one."""
  num_shards = max(1, min(num_shards, len(items)))
  bounds = [len(items) * i // num_shards for i in range(num_shards + 1)]
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _template(recipe: Recipe, work: epath.Path, split: str):
  from tensorflow_datasets.core import naming
  return naming.ShardedFileTemplate(data_dir=work, dataset_name=recipe.name, split=split,
                                    filetype_suffix="array_record")


def shard_path(recipe: Recipe, work: epath.Path, shard: Shard) -> epath.Path:
  return _template(recipe, work, shard.split).sharded_filepath(shard_index=shard.index,
                                                               num_shards=shard.num_shards)


_SERIALIZERS: dict = {}


def write_shard(recipe: Recipe, work: epath.Path, shard: Shard) -> Shard:
  """Writes one shard (to a temporary name, renamed when whole); returns it."""
  from tensorflow_datasets.core import example_serializer, file_adapters

  key = (recipe.name, recipe.version)
  if key not in _SERIALIZERS:      # once per worker process
    features = recipe.features()
    _SERIALIZERS[key] = features, example_serializer.ExampleSerializer(features.get_serialized_info())
  features, serializer = _SERIALIZERS[key]
  path = shard_path(recipe, work, shard)
  tmp = path.parent / (path.name + ".tmp")
  records = ((k, serializer.serialize_example(features.encode_example(ex))) for k, ex in recipe.examples(shard.payload))
  file_adapters.ArrayRecordFileAdapter.write_examples(tmp, records)
  tmp.replace(path)
  return shard


def _write_shard_star(args) -> Shard:
  return write_shard(*args)


def _read_record(directory: epath.Path) -> dict | None:
  f = directory / RECORD
  return json.loads(f.read_text()) if f.exists() else None


def progress(total: int, desc: str, initial: int = 0, unit: str = "examples"):
  """A progress bar on a terminal; otherwise a plain line at every tenth of the way."""
  from tqdm import tqdm
  if sys.stderr.isatty():
    return tqdm(total=total, initial=initial, desc=desc, unit=" " + unit, smoothing=0.05)

  class Lines:
    def __init__(self):
      self.n, self.next = initial, 0

    def update(self, k):
      self.n += k
      if self.n * 10 >= self.next * total:
        print(f"{desc}: {self.n}/{total} {unit}", flush=True)
        self.next = self.n * 10 // max(total, 1) + 1

    def close(self):
      pass
  return Lines()


def prepare(recipe: Recipe, data_dir: str, workers: int | None = None) -> epath.Path:
  """Prepares `recipe` under `data_dir` (resuming a partial preparation); returns the set's
  directory. `workers`: processes writing shards (default: one per core; 1: in this process)."""
  from tensorflow_datasets.core import splits as split_lib

  root = epath.Path(data_dir)
  if root.exists() and not root.is_dir():
    raise DataError(f"--data_dir {root} is a file: pass a directory.")
  final = root / recipe.name / recipe.version
  work = root / recipe.name / f"{INCOMPLETE}{recipe.version}"
  wanted = {"dataset": recipe.name, "version": recipe.version, "options": recipe.options()}
  if final.exists():
    return _finished(recipe, final, wanted)
  record = _read_record(work) if work.exists() else None
  if record is not None and record != wanted:
    raise DataError(f"{work} holds a partial preparation of another {recipe.name} ({record['options']}, not "
                    f"{wanted['options']}): rerun with its options to finish it, or delete it.")
  created = not work.exists()
  (work / SCRATCH).mkdir(parents=True, exist_ok=True)
  (work / RECORD).write_text(json.dumps(wanted, indent=1, sort_keys=True))
  for stale in work.glob("*.tmp"):          # a shard being written when the last run stopped
    stale.unlink()
  try:
    shards = recipe.plan(work / SCRATCH)
  except DataError:
    if created:                             # bad input: leave no trace of this run
      work.rmtree()
      if not any(work.parent.iterdir()):
        work.parent.rmdir()
    raise
  todo = [s for s in shards if not shard_path(recipe, work, s).exists()]
  total = sum(s.examples for s in shards)
  bar = progress(total, recipe.name, initial=total - sum(s.examples for s in todo))
  workers = (os.cpu_count() or 1) if workers is None else workers
  done = len(shards) - len(todo)
  try:
    if workers <= 1 or len(todo) <= 1:
      for s in todo:
        bar.update(write_shard(recipe, work, s).examples)
        done += 1
    else:
      with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
        for s in pool.imap_unordered(_write_shard_star, [(recipe, work, s) for s in todo]):
          bar.update(s.examples)
          done += 1
  except KeyboardInterrupt:
    bar.close()
    print(f"{recipe.name}: interrupted, {done} of {len(shards)} shards are finished in {work}: run the same "
          f"command again to write the rest.", file=sys.stderr)
    raise
  bar.close()

  features = recipe.features()
  info = recipe.info(features, root)
  split_infos = []
  for split in dict.fromkeys(s.split for s in shards):
    mine = sorted((s for s in shards if s.split == split), key=lambda s: s.index)
    split_infos.append(split_lib.SplitInfo(
        name=split, shard_lengths=[s.examples for s in mine], filename_template=_template(recipe, work, split),
        num_bytes=sum(shard_path(recipe, work, s).stat().length for s in mine)))
  info.set_splits(split_lib.SplitDict(split_infos))
  info.write_to_directory(work)
  (work / SCRATCH).rmtree()
  work.rename(final)
  return final


def _finished(recipe: Recipe, final: epath.Path, wanted: dict) -> epath.Path:
  """A set already there: the same one is left as it is; another is a one-line error."""
  if not (final / "dataset_info.json").exists():
    raise DataError(f"{final} exists but holds no finished data set (no dataset_info.json): delete it, "
                    f"or pass another --data_dir.")
  record = _read_record(final) or {"options": {}}   # a set from `tfds build` records no options
  if record["options"] != wanted["options"]:
    raise DataError(f"{final} already holds {recipe.name} {recipe.version} made with other options "
                    f"({record['options']}, not {wanted['options']}): pass another --data_dir, or delete it.")
  print(f"{recipe.name} {recipe.version} is already prepared in {final}.")
  return final


def sources_exist(paths: Iterable[epath.Path], what: str) -> None:
  """A one-line error for the first of `paths` that is missing."""
  for p in paths:
    if not p.exists():
      raise DataError(f"{p} not found: put {what} there (see docs/data.md), or pass the right --manual_dir.")
