"""The config a run saves in its work directory (and an export carries), read back and compared.

No orbax here: reading a config is all `load` of an exported file needs.
"""
from __future__ import annotations

import json

import ml_collections
from etils import epath
from flax import traverse_util

from ge2mst_jax.io import paths
from ge2mst_jax.io.errors import CheckpointError

FILE = "config.json"


def save(cfg, workdir) -> None:
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(wd / FILE, cfg.to_json(indent=2))


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def read(workdir, required: bool = True) -> ml_collections.ConfigDict | None:
  """The config a train.py run saved in its work directory (None if absent and not `required`)."""
  path = epath.Path(workdir) / FILE
  if not path.exists():
    if not required:
      return None
    raise CheckpointError(f"{workdir} has no {FILE}: it is not a work directory written by train.py.")
  return from_json(path.read_text())


def flat(tree: dict, sep: str = "/") -> dict:
  """Nested dicts as one dict keyed by joined paths (keys may be ints: nnx list indices)."""
  return {sep.join(map(str, path)): v for path, v in traverse_util.flatten_dict(tree).items()}


def diff(saved, current) -> list[str]:
  """`key: saved -> current` for every config value that differs (JSON-normalised)."""
  a, b = (flat(json.loads(c.to_json()), ".") for c in (saved, current))
  return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]
