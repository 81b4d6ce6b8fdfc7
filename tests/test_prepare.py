"""`python -m ge2mst_jax.prepare`: the four data sets from raw files the tests write in the real
formats (no downloads, no TensorFlow), read back by the configs; resuming; one-line errors."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import cifar10, cifar10_dvs as dvs_config, cifar100, imagenet2012
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.io.errors import DataError
from ge2mst_jax.prepare import cifar, cifar10_dvs, events, imagenet, writer
from ge2mst_jax.train import loop as train_lib
from tests import raw_data
from tests.test_train import ROOT, SHALLOW_DEPTHS

CONFIGS = {"cifar10": cifar10, "cifar100": cifar100}


def tiny_run(cfg, workdir: str) -> dict:
  """Two training steps and one evaluation of the smallest network the training tests run."""
  cfg.batch_size, cfg.eval_batch_size, cfg.total_steps = 8, 8, 2
  cfg.log_every, cfg.checkpoint_every, cfg.async_checkpoints, cfg.watchdog_secs = 1, 0, False, 0
  cfg.optimizer.warmup_steps = 1
  cfg.eval_modes = ("quantize",)
  cfg.data.image_size = 16
  cfg.model.arch.widths, cfg.model.arch.heads, cfg.model.arch.stem_width = (8, 16, 16, 32), (1, 1, 1), 8
  cfg.model.arch.depths = SHALLOW_DEPTHS
  return train_lib.train_and_evaluate(cfg, workdir, quiet=True)


# ----------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_sets(tmp_path_factory):
  """{name: (data_dir, the pickles' arrays)}: both CIFARs, 40 train and 16 test images each."""
  out = {}
  for name in CONFIGS:
    d = tmp_path_factory.mktemp(name)
    raw = raw_data.cifar_tarball(str(d / "downloads"), name, train=40, test=16, seed=len(name))
    writer.prepare(cifar.Cifar(name, str(d / "downloads"), shard_size=24), str(d / "tfds"), workers=1)
    out[name] = (str(d / "tfds"), raw)
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cifar_set_is_the_pickles_in_tfds_layout(cifar_sets, name):
  data_dir, raw = cifar_sets[name]
  official = tfds.builder(name, file_format="array_record").info.features
  for split, (images, fine, coarse) in raw.items():
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    assert len(src) == len(images)
    assert src.dataset_info.features.get_serialized_info() == official.get_serialized_info()
    by_id = {src[i]["id"].decode(): src[i] for i in range(len(src))}
    assert sorted(by_id) == [f"{split}_{i:05d}" for i in range(len(images))]
    for i in range(len(images)):
      rec = by_id[f"{split}_{i:05d}"]
      np.testing.assert_array_equal(rec["image"], images[i])
      assert rec["label"] == fine[i] and (name == "cifar10" or rec["coarse_label"] == coarse[i])
  names = src.dataset_info.features["label"].names
  assert names[:2] == ["c0", "c1"] and len(names) == (100 if name == "cifar100" else 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cifar_config_trains_and_evaluates_on_the_prepared_set(cifar_sets, name, tmp_path):
  cfg = CONFIGS[name].get_config("tiny")
  cfg.data.data_dir = cifar_sets[name][0]
  out = tiny_run(cfg, str(tmp_path))
  assert out["examples"] == 16 and 0 <= out["accuracy_quantize"] <= 1


# ----------------------------------------------------------------------------
# ImageNet
# ----------------------------------------------------------------------------
CMYK = "n01739381_1309.JPEG"   # on tfds' list of ILSVRC2012's CMYK JPEGs
PNG = "n02105855_2933.JPEG"    # tfds' one PNG named .JPEG
PER_CLASS = {"n01440764": 4, "n01739381": 3, "n02105855": 3}


@pytest.fixture(scope="module")
def imagenet_downloads(tmp_path_factory):
  d = tmp_path_factory.mktemp("imagenet") / "downloads"
  return str(d), raw_data.imagenet_manual_dir(str(d), PER_CLASS, validation=5, cmyk=CMYK, png=PNG)


def test_imagenet_keeps_the_jpegs_fixes_cmyk_and_png_and_reads_through_the_imagenet_pipeline(imagenet_downloads, tmp_path):
  manual, files = imagenet_downloads
  writer.prepare(imagenet.ImageNet(manual, shard_size=4), str(tmp_path), workers=1)
  synsets = tfds.builder("imagenet2012").info.features["label"].names
  seen = {}
  for split, n in (("train", 10), ("validation", 5)):
    src = tfds.data_source("imagenet2012", split=split, data_dir=str(tmp_path), download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    assert len(src) == n
    for i in range(n):
      rec = src[i]
      seen[rec["file_name"].decode()] = (synsets[rec["label"]], rec["image"])
  assert sorted(seen) == sorted(files)
  for name, (synset, data) in seen.items():
    assert synset == files[name][0]
    if name in (CMYK, PNG):
      with Image.open(io.BytesIO(data)) as im, Image.open(io.BytesIO(files[name][1])) as raw:
        assert (im.format, im.mode) == ("JPEG", "RGB") and (raw.format, raw.mode) != ("JPEG", "RGB")
        # The same picture (JPEG's chroma subsampling blurs the colour grain of these test images).
        fixed, orig = np.asarray(im, np.float32), np.asarray(raw.convert("RGB"), np.float32)
        assert np.abs(fixed - orig).mean() < 20 and np.abs(fixed.mean((0, 1)) - orig.mean((0, 1))).max() < 2
    else:
      assert data == files[name][1]    # the JPEG bytes as they were
  # Training shards hold the classes mixed: any contiguous part (one host's share) sees several.
  train = tfds.data_source("imagenet2012", split="train", data_dir=str(tmp_path), download=False)
  assert len({int(train[i]["label"]) for i in range(4)}) > 1

  cfg = imagenet2012.get_config("tiny").data
  cfg.data_dir, cfg.workers, cfg.image_size = str(tmp_path), 0, 32
  b = next(iter(data_lib.train_dataset(cfg, 4, 0)))
  e = next(data_lib.eval_batches(cfg, 8, 1))
  assert b["image"].shape == (4, 32, 32, 3) and e["image"].shape == (8, 32, 32, 3) and e["mask"].sum() == 5
  assert np.isfinite(b["image"]).all()


def test_interrupted_imagenet_preparation_resumes_to_the_same_files(imagenet_downloads, tmp_path, monkeypatch):
  manual, _ = imagenet_downloads
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  writer.prepare(imagenet.ImageNet(manual, shard_size=3), str(whole), workers=1)

  real, written = writer.write_shard, []

  def stop_at_third(recipe, work, shard):
    if len(written) == 2:
      (writer.shard_path(recipe, work, shard).parent / "half-written.array_record.tmp").write_bytes(b"x")
      raise KeyboardInterrupt
    written.append((shard.split, shard.index))
    return real(recipe, work, shard)
  monkeypatch.setattr(writer, "write_shard", stop_at_third)
  with pytest.raises(KeyboardInterrupt):
    writer.prepare(imagenet.ImageNet(manual, shard_size=3), str(resumed), workers=1)
  # The partial output is not a data set to tfds, nor to the configs.
  with pytest.raises(DataError, match="not prepared"):
    data_lib.tfds_source("imagenet2012", "train", str(resumed))

  first, written[:] = list(written), []
  monkeypatch.setattr(writer, "write_shard", lambda *a: (written.append((a[2].split, a[2].index)), real(*a))[1])
  writer.prepare(imagenet.ImageNet(manual, shard_size=3), str(resumed), workers=1)
  assert not set(first) & set(written) and len(first) + len(written) == 4 + 2   # 10 train, 5 validation
  a, b = whole / "imagenet2012" / "5.1.0", resumed / "imagenet2012" / "5.1.0"
  assert sorted(os.listdir(a)) == sorted(os.listdir(b)) and "scratch" not in os.listdir(a)
  for f in os.listdir(a):
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  assert os.listdir(b.parent) == ["5.1.0"]


# ----------------------------------------------------------------------------
# CIFAR10-DVS
# ----------------------------------------------------------------------------
def small_split() -> dict:
  """A few of the stored split's recordings: 2 training and 1 test recording of each class."""
  split = cifar10_dvs.stored_split()
  return {s: [i for c in cifar10_dvs.CLASSES for i in [j for j in split[s] if j.startswith(c + "/")][:k]]
          for s, k in (("train", 2), ("test", 1))}


@pytest.fixture(scope="module")
def dvs_set(tmp_path_factory):
  d = tmp_path_factory.mktemp("dvs")
  split = small_split()
  recordings = raw_data.dvs_recordings(str(d / "downloads"), split["train"] + split["test"], zipped=("cat", "ship"))
  writer.prepare(cifar10_dvs.Cifar10Dvs(str(d / "downloads"), frames=4, size=64, split=split, shard_size=8),
                 str(d / "tfds"), workers=1)
  return str(d / "tfds"), split, recordings


def direct_frames(ev: dict, frames: int, size: int) -> np.ndarray:
  """Frame counts event by event: equal runs of N // frames events, the last takes the rest."""
  out = np.zeros((frames, size, size, 2), np.int64)
  per = len(ev["t"]) // frames
  for k in range(len(ev["t"])):
    out[min(k // per, frames - 1), ev["y"][k] * size // 128, ev["x"][k] * size // 128, ev["p"][k]] += 1
  return out


def test_dvs_frames_are_the_event_counts_per_polarity(dvs_set):
  data_dir, split, recordings = dvs_set
  info = tfds.builder("cifar10_dvs", data_dir=data_dir).info
  assert info.metadata["frames"] == 4 and info.metadata["size"] == 64 and info.metadata["split_by"] == "number"
  for s in ("train", "test"):
    src = tfds.data_source("cifar10_dvs", split=s, data_dir=data_dir, download=False)
    assert sorted(src[i]["file_name"].decode() for i in range(len(src))) == sorted(split[s])
    for i in range(len(src)):
      rec = src[i]
      ident = rec["file_name"].decode()
      assert rec["image"].dtype == np.uint16 and cifar10_dvs.CLASSES[rec["label"]] == ident.split("/")[0]
      np.testing.assert_array_equal(rec["image"], direct_frames(recordings[ident], 4, 64))
  # At the sensor's size the reader's coordinates are the recording's, event for event.
  ev = recordings[split["train"][0]]
  parsed = events.parse_aedat(raw_data.aedat_bytes(**ev))
  for k in "xypt":
    np.testing.assert_array_equal(parsed[k], ev[k])


def test_dvs_split_is_stratified_nine_to_one_and_the_same_on_every_build():
  stored = np.load(cifar10_dvs.SPLIT_FILE)
  np.testing.assert_array_equal(stored, cifar10_dvs.make_split(cifar10_dvs.SEED))
  split = cifar10_dvs.stored_split()
  assert len(split["train"]) == 9000 and len(split["test"]) == 1000
  assert len(set(split["train"]) | set(split["test"])) == 10000
  for c in cifar10_dvs.CLASSES:
    assert sum(i.startswith(c + "/") for i in split["test"]) == 100
  assert {int(i.split("/")[1]) for i in split["test"] + split["train"]} == set(range(1000))


@pytest.mark.slow
def test_dvs_config_trains_on_the_prepared_set(dvs_set, tmp_path):
  cfg = dvs_config.get_config("tiny,frames=4")
  cfg.data.data_dir = dvs_set[0]
  out = tiny_run(cfg, str(tmp_path))
  assert out["examples"] == 10 and 0 <= out["accuracy_quantize"] <= 1


def test_a_config_with_other_frames_than_the_set_is_a_one_line_error(dvs_set):
  cfg = dvs_config.get_config("tiny,frames=6").data
  cfg.data_dir = dvs_set[0]
  with pytest.raises(DataError, match=r"holds 4 frames per sample, the config 6: pass .*event_frames=4") as err:
    data_lib.make_source(cfg, "train")
  assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------
# Bad input: one line naming the file and the fix
# ----------------------------------------------------------------------------
def one_line_error(recipe, data_dir, match):
  with pytest.raises(DataError, match=match) as err:
    writer.prepare(recipe, str(data_dir), workers=1)
  assert "\n" not in str(err.value)
  return str(err.value)


def test_bad_downloads_are_one_line_errors_naming_the_file(tmp_path, dvs_set):
  d = tmp_path / "downloads"
  one_line_error(cifar.Cifar("cifar10", str(d)), tmp_path / "out", r"cifar-10-python.tar.gz not found")
  assert not (tmp_path / "out" / "cifar10").exists()   # a refused run leaves nothing behind
  raw_data.cifar_tarball(str(d), "cifar10", 10, 5)
  tarball = d / "cifar-10-python.tar.gz"
  tarball.write_bytes(tarball.read_bytes()[:len(tarball.read_bytes()) // 2])
  one_line_error(cifar.Cifar("cifar10", str(d)), tmp_path / "out", r"cifar-10-python.tar.gz is not a complete .* again")

  raw_data.imagenet_manual_dir(str(d), {"n01440764": 2}, validation=2)
  train_tar = d / "ILSVRC2012_img_train.tar"
  data = train_tar.read_bytes()
  train_tar.write_bytes(data[:len(data) * 4 // 10])   # inside the class tar
  one_line_error(imagenet.ImageNet(str(d)), tmp_path / "out", r"ILSVRC2012_img_train.tar (is truncated|is not a readable tar)")
  train_tar.write_bytes(b"not a tar" * 100)
  one_line_error(imagenet.ImageNet(str(d)), tmp_path / "out", r"ILSVRC2012_img_train.tar is not a readable tar")
  (d / "ILSVRC2012_img_val.tar").unlink()
  one_line_error(imagenet.ImageNet(str(d)), tmp_path / "out", r"ILSVRC2012_img_val.tar not found")

  split = small_split()
  raw_data.dvs_recordings(str(d), split["train"] + split["test"])
  c, number = split["test"][0].split("/")
  rec = d / c / f"cifar10_{c}_{number}.aedat"
  good = rec.read_bytes()
  rec.write_bytes(good[:-3])
  small = dict(frames=4, size=64, split=split)
  one_line_error(cifar10_dvs.Cifar10Dvs(str(d), **small), tmp_path / "dvs", rf"{rec.name} is truncated")
  rec.write_bytes(b"PK" + good)
  one_line_error(cifar10_dvs.Cifar10Dvs(str(d), **small), tmp_path / "dvs", rf"{rec.name} is not an AEDAT recording")
  one_line_error(cifar10_dvs.Cifar10Dvs(str(d), frames=4), tmp_path / "dvs-all",
                 r"of the 10000 CIFAR10-DVS recordings are missing .*give all ten classes")


def test_an_output_holding_another_set_is_a_one_line_error_and_the_same_set_is_left(dvs_set, tmp_path, capsys):
  data_dir, split, _ = dvs_set
  same = cifar10_dvs.Cifar10Dvs("unused", frames=4, size=64, split=split)
  writer.prepare(same, data_dir)                      # already there: nothing to do
  assert "already prepared" in capsys.readouterr().out
  other = cifar10_dvs.Cifar10Dvs("unused", frames=5, size=64, split=split)
  one_line_error(other, data_dir, r"cifar10_dvs/1.0.0 already holds cifar10_dvs 1.0.0 made with other options")
  # A partial preparation with other options is not finished with these.
  work = tmp_path / "cifar10_dvs" / "incomplete.1.0.0"
  work.mkdir(parents=True)
  (work / writer.RECORD).write_text(json.dumps({"dataset": "cifar10_dvs", "version": "1.0.0",
                                                "options": other.options()}))
  one_line_error(same, tmp_path, r"incomplete.1.0.0 holds a partial preparation of another cifar10_dvs .* delete it")


def test_the_command_line_prints_one_line_errors(tmp_path):
  r = subprocess.run([sys.executable, "-m", "ge2mst_jax.prepare", "imagenet2012", "--manual_dir", "/nonexistent",
                      "--data_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      "python -m ge2mst_jax.prepare: /nonexistent/ILSVRC2012_img_train.tar not found: put ImageNet's tars there "
      "(see docs/data.md), or pass the right --manual_dir."]
  assert os.listdir(tmp_path) == []
