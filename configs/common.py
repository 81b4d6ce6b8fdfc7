"""Defaults shared by every config; each data set's file overrides what differs."""
import ml_collections

from ge2mst_jax.io import saved_config
from ge2mst_jax.nn import models


def arch_dict(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every ArchConfig field of a family member, so `--config.model.arch.FIELD=...` works for all.
  An override given as a FieldReference stays one: the field is shared with whatever else holds it."""
  refs = {k: v for k, v in overrides.items() if isinstance(v, ml_collections.FieldReference)}
  arch = models.arch_config(name, **{**overrides, **{k: v.get() for k, v in refs.items()}}).flat()
  # None ("automatic") fields become typed placeholders that a flag can still set.
  arch = {k: ml_collections.config_dict.placeholder(int) if v is None else v for k, v in arch.items()}
  return ml_collections.ConfigDict({**arch, **refs})


def parse_arg(arg: str | None, **defaults) -> dict:
  """`"small,steps=100"` -> {'size': 'small', 'steps': '100'} over the defaults."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if value:
      out[key] = value
    else:
      out["size"] = key
  return out


def steps_per_epoch(c: ml_collections.ConfigDict, train_images: int):
  """Steps of one pass over `train_images`, as a reference to `c.batch_size`: schedules built
  from it follow the batch size, also when it is overridden on the command line."""
  return train_images // c.get_ref("batch_size")


def base_config(model: str, *, dataset: str, num_classes: int, image_size: int, event_frames: int = 0,
                **arch) -> ml_collections.ConfigDict:
  """Today's defaults (`saved_config.defaults`, the one place a key gets its default) with the data
  set and the network. `image_size` and `event_frames` are one FieldReference each, held by
  `data` and `model.arch` alike: an override of either (`--config.data.image_size=64`) is both."""
  c = saved_config.defaults()
  shared = {"image_size": ml_collections.FieldReference(image_size),
            "event_frames": ml_collections.FieldReference(event_frames)}
  c.model = ml_collections.ConfigDict({"name": model, "arch": arch_dict(model, **shared, **arch)})
  c.data.name, c.data.num_classes = dataset, num_classes
  for key, ref in shared.items():
    c.data[key] = ref
  return c
