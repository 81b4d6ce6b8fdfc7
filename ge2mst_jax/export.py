"""Using trained weights elsewhere: `load` a work directory or exported file, `export` a portable one.

    model, config = ge2mst_jax.load("workdirs/digits")      # or "digits.safetensors"
    logits = model(images, mode="spike")

The exported file is safetensors: every model array (parameters, BatchNorm statistics,
thresholds) under its '/'-joined path, and the training config as JSON in the metadata.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from ge2mst_jax import checkpoint as ckpt_lib

CONFIG_FILE = "config.json"


def save_config(cfg, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(cfg.to_json(indent=2))


def _config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a train.py run saved in its work directory."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ckpt_lib.CheckpointError(f"{workdir} has no {CONFIG_FILE}: it is not a work directory written by train.py.")
  with open(path) as f:
    return _config_from_json(f.read())


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    out.update(_flatten(v, key) if isinstance(v, dict) else {key: np.asarray(v)})
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    parts = [int(p) if p.isdigit() else p for p in key.split("/")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


def _model_from_workdir(workdir: str, step: int | None = None):
  from ge2mst_jax import sharding as shd
  from ge2mst_jax import train_lib

  cfg = read_config(workdir)
  setup, step = train_lib.restore_train_state(cfg, os.path.join(workdir, "checkpoints"),
                                              shd.make_mesh(1, jax.devices()[:1]), step)
  model, _ = nnx.merge(setup.graphdef, setup.state)
  model.eval()
  return model, cfg, step


def load(path: str, step: int | None = None):
  """`(model, config)` from a work directory (newest checkpoint, or `step`) or an exported file."""
  if os.path.isdir(path):
    model, cfg, _ = _model_from_workdir(path, step)
    return model, cfg
  if not os.path.exists(path):
    raise ckpt_lib.CheckpointError(f"Nothing to load at {path}: pass a work directory or an exported .safetensors file.")
  from safetensors import SafetensorError
  from safetensors.numpy import load_file, safe_open

  from ge2mst_jax import train_lib

  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
    flat = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ckpt_lib.CheckpointError(f"{path} is not a readable ge2mst_jax export ({e}).") from None
  if "config" not in meta:
    raise ckpt_lib.CheckpointError(f"{path} has no ge2mst_jax config in its metadata: was it written by export()?")
  cfg = _config_from_json(meta["config"])
  model = train_lib.build_model(cfg)
  pure = _unflatten({k: jax.numpy.asarray(v) for k, v in flat.items()})
  try:
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
  except (KeyError, ValueError) as e:
    raise ckpt_lib.CheckpointError(f"{path} does not fit the model its config describes ({e}).") from None
  model.eval()
  return model, cfg


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the newest (or `step`) checkpoint's model and config of `workdir` to `out` (safetensors)."""
  from safetensors.numpy import save_file

  model, cfg, step = _model_from_workdir(workdir, step)
  flat = _flatten(jax.device_get(nnx.to_pure_dict(nnx.state(model))))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save_file(flat, out, metadata={"config": cfg.to_json(), "step": str(step), "format": "ge2mst_jax/1"})
  return out
