"""Using trained weights elsewhere: `load` a work directory or exported file, `export` a portable one.

    model, config = ge2mst_jax.load("workdirs/digits")      # or "digits.safetensors"
    logits = model(images, mode="spike")

The exported file is safetensors: every model array (parameters, BatchNorm statistics,
thresholds) under its '/'-joined path, and the training config as JSON in the metadata.
Work directories and exported files may be local or in a bucket (`gs://...`).
"""
from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath
from flax import nnx

from ge2mst_jax import checkpoint as ckpt_lib
from ge2mst_jax import paths


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    parts = [int(p) if p.isdigit() else p for p in key.split("/")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


def _model_from_workdir(workdir, step: int | None = None):
  from ge2mst_jax import sharding as shd
  from ge2mst_jax import train_lib

  cfg = ckpt_lib.read_config(workdir)
  setup, step = train_lib.restore_train_state(cfg, epath.Path(workdir) / "checkpoints",
                                              shd.make_mesh(1, jax.devices()[:1]), step)
  model, _ = nnx.merge(setup.graphdef, setup.state)
  model.eval()
  return model, cfg, step


def _read_safetensors(data: bytes) -> tuple[dict, dict]:
  """(arrays, metadata) of a safetensors file's bytes (read whole: the file may be in a bucket)."""
  from safetensors.numpy import load as load_bytes
  n = int.from_bytes(data[:8], "little")
  meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
  return load_bytes(data), meta


def load(path, step: int | None = None):
  """`(model, config)` from a work directory (newest checkpoint, or `step`) or an exported file."""
  p = epath.Path(path)
  if p.is_dir():
    model, cfg, _ = _model_from_workdir(p, step)
    return model, cfg
  if not p.exists():
    raise ckpt_lib.CheckpointError(f"Nothing to load at {path}: pass a work directory or an exported .safetensors file.")
  from safetensors import SafetensorError

  from ge2mst_jax import train_lib

  try:
    flat, meta = _read_safetensors(p.read_bytes())
  except (SafetensorError, OSError, ValueError) as e:
    raise ckpt_lib.CheckpointError(f"{path} is not a readable ge2mst_jax export ({e}).") from None
  if "config" not in meta:
    raise ckpt_lib.CheckpointError(f"{path} has no ge2mst_jax config in its metadata: was it written by export()?")
  cfg = ckpt_lib.config_from_json(meta["config"])
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


def export(workdir, out, step: int | None = None) -> str:
  """Writes the newest (or `step`) checkpoint's model and config of `workdir` to `out` (safetensors)."""
  from safetensors.numpy import save as to_bytes

  model, cfg, step = _model_from_workdir(workdir, step)
  flat = {k: np.asarray(v) for k, v in ckpt_lib.flatten(jax.device_get(nnx.to_pure_dict(nnx.state(model)))).items()}
  dest = paths.resolve(out)
  dest.parent.mkdir(parents=True, exist_ok=True)
  dest.write_bytes(to_bytes(flat, metadata={"config": cfg.to_json(), "step": str(step), "format": "ge2mst_jax/1"}))
  return str(out)
