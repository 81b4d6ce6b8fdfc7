"""Using trained weights elsewhere: `load` a work directory or exported file, `export` a portable one.

    model, config = ge2mst_jax.load("workdirs/digits")      # or "digits.safetensors"
    images = ge2mst_jax.eval_transform(config)(uint8_images)  # the run's resize/crop and normalisation
    logits = model(images, mode="spike")

The exported file is safetensors: every model array (parameters, BatchNorm statistics,
thresholds) under its '/'-joined path, and the training config as JSON in the metadata;
beside it a manifest (sha256, step, config, evaluated metrics, package version).
Work directories and exported files may be local or in a bucket (`gs://...`).
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from etils import epath
from flax import nnx, traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_from_bytes
from safetensors.numpy import save as safetensors_to_bytes

from ge2mst_jax import __version__
from ge2mst_jax.io import paths
from ge2mst_jax.io import saved_config
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.io.errors import CheckpointError
from ge2mst_jax.nn.models import model_from_config, upgrade_legacy_tree

EXPORT_FORMAT = "ge2mst_jax/2"


def _model_from_workdir(workdir, step: int | None = None):
  # orbax and optax only here: loading an exported file does not need the training stack.
  from ge2mst_jax.train.state import model_and_optimizer, restore_train_state

  cfg = saved_config.read(workdir)
  setup, step = restore_train_state(cfg, epath.Path(workdir) / "checkpoints", shd.make_mesh(1, jax.devices()[:1]), step)
  model, _ = model_and_optimizer(setup.graphdef, setup.state)
  model.eval()
  return model, cfg, step


def _read_safetensors(data: bytes) -> tuple[dict, dict]:
  """(arrays, metadata) of a safetensors file's bytes (read whole: the file may be in a bucket)."""
  n = int.from_bytes(data[:8], "little")
  meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
  return safetensors_from_bytes(data), meta


def load(path, step: int | None = None):
  """`(model, config)` from a work directory (newest checkpoint, or `step`) or an exported file."""
  p = epath.Path(path)
  if p.is_dir():
    model, cfg, _ = _model_from_workdir(p, step)
    return model, cfg
  if not p.exists():
    raise CheckpointError(f"Nothing to load at {path}: pass a work directory or an exported .safetensors file.")
  try:
    flat, meta = _read_safetensors(p.read_bytes())
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path} is not a readable ge2mst_jax export ({e}).") from None
  if "config" not in meta:
    raise CheckpointError(f"{path} has no ge2mst_jax config in its metadata: was it written by export()?")
  if meta.get("format") not in ("ge2mst_jax/1", EXPORT_FORMAT):   # before the config, which may be newer too
    raise CheckpointError(f"{path} has export format {meta.get('format')!r}; this ge2mst_jax reads "
                          f"'ge2mst_jax/1' and {EXPORT_FORMAT!r}: load it with the ge2mst_jax that wrote it.")
  cfg = saved_config.from_json(meta["config"])
  model = model_from_config(cfg)
  pure = nnx.restore_int_paths(traverse_util.unflatten_dict({k: jax.numpy.asarray(v) for k, v in flat.items()}, sep="/"))
  if meta["format"] == "ge2mst_jax/1":   # attention paths as they were before format 2
    pure = upgrade_legacy_tree(pure)
  try:
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{path} does not fit the model its config describes ({e}).") from None
  model.eval()
  return model, cfg


def manifest_path(out) -> epath.Path:
  """Where `export` writes the manifest of `out`: beside it, `NAME.manifest.json`."""
  p = paths.resolve(out)
  return p.parent / (p.name.removesuffix(".safetensors") + ".manifest.json")


def export(workdir, out, step: int | None = None) -> str:
  """Writes the newest (or `step`) checkpoint's model and config of `workdir` to `out` (safetensors).

  Beside it, `manifest_path(out)`: the file's sha256, the step, the config, the metrics the
  run evaluated (its `summary.json`, when the exported step is the one it evaluated) and the
  package version, so a ported checkpoint can be checked against what it scored here.
  """
  model, cfg, step = _model_from_workdir(workdir, step)
  flat = {k: np.asarray(v) for k, v in saved_config.flat(jax.device_get(nnx.to_pure_dict(nnx.state(model)))).items()}
  dest = paths.resolve(out)
  dest.parent.mkdir(parents=True, exist_ok=True)
  data = safetensors_to_bytes(flat, metadata={"config": cfg.to_json(), "step": str(step), "format": EXPORT_FORMAT})
  dest.write_bytes(data)
  summary = epath.Path(workdir) / "summary.json"
  metrics = json.loads(summary.read_text()) if summary.exists() else {}
  manifest = {"file": dest.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "step": step,
              "ge2mst_jax": __version__, "config": json.loads(cfg.to_json()),
              "metrics": {k: v for k, v in metrics.items() if k != "workdir"} if metrics.get("step") == step else {}}
  paths.write_text_atomic(manifest_path(out), json.dumps(manifest, indent=2))
  return str(out)
