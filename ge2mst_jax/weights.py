"""Using trained weights elsewhere: `load` a work directory or an export, `export` a portable one.

    model, config = ge2mst_jax.load("workdirs/digits")      # or "digits.safetensors", or an export folder
    images = ge2mst_jax.eval_transform(config)(uint8_images)  # the run's resize/crop and normalisation
    logits = model(images, mode="spike")
    backbone, _ = ge2mst_jax.load("workdirs/digits", num_classes=0)   # without its classifier

The exported file is safetensors: every model array (parameters, BatchNorm statistics,
thresholds) under its '/'-joined path, and the training config as JSON in the metadata;
beside it a manifest (sha256, step, config, evaluated metrics, package version) and the
inference function of each mode as a `jax.export` program (`nn/serving.py`) that JAX alone runs.
Exported to a folder (a path without `.safetensors`), the same files plus `config.json` and a
README.md model card: a model hub's layout (`huggingface_hub.upload_folder` takes it as it is).
Work directories and exports may be local or in a bucket (`gs://...`).
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
from ge2mst_jax.data import transforms
from ge2mst_jax.io import model_card, paths
from ge2mst_jax.io import saved_config
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train.finetune import load_matching
from ge2mst_jax.io.errors import CheckpointError
from ge2mst_jax.nn import serving
from ge2mst_jax.nn.models import Ge2msT, count_params, model_from_config, upgrade_legacy_tree

EXPORT_FORMAT = "ge2mst_jax/2"
WEIGHTS_FILE = "model.safetensors"   # an export folder's weights; its manifest is `manifest.json`
# The evaluation report's figures an export carries (eval.py's report.json of the exported step).
EVALUATION_KEYS = ("accuracy_quantize", "accuracy_spike", "prediction_agreement", "max_rel_logit_diff", "examples",
                   "sops_per_image", "energy_mj_per_image", "energy_images", "mean_firing_rate", "T", "K")


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


def load(path, step: int | None = None, *, num_classes: int | None = None):
  """`(model, config)` from a work directory (newest checkpoint, or `step`), an exported file or an
  export folder. The model is in inference mode (`model.eval()`).

  `num_classes`: another head. 0 gives the backbone without a classifier (calls return the
  pooled embedding); another count a fresh classifier (from the run's seed) on the trained
  network, to fine-tune. Every other array is the checkpoint's.
  """
  p = epath.Path(path)
  if p.is_dir() and not (p / WEIGHTS_FILE).exists():
    model, cfg, _ = _model_from_workdir(p, step)
  else:
    model, cfg = _load_export(p / WEIGHTS_FILE if p.is_dir() else p, path)
  if num_classes is not None and num_classes != model.num_classes:
    model = _with_head(model, num_classes, cfg.seed)
  return model, cfg


def _with_head(model: Ge2msT, num_classes: int, seed: int) -> Ge2msT:
  """`model` with a fresh classifier for `num_classes` (none for 0): fine-tuning's copy by path."""
  new = Ge2msT(model.cfg, num_classes, rngs=nnx.Rngs(seed))
  state = nnx.state(new)
  pure, _, _ = load_matching(nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.state(model)))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(new, state)
  new.eval()
  return new


def _load_export(p: epath.Path, path):
  if not p.exists():
    raise CheckpointError(f"Nothing to load at {path}: pass a work directory, an export folder or an exported "
                          f".safetensors file.")
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


def _is_folder(out) -> bool:
  return not str(out).endswith(".safetensors")


def manifest_path(out) -> epath.Path:
  """Where `export` writes the manifest of `out`: beside a file, `NAME.manifest.json`; in a folder,
  `manifest.json`."""
  p = paths.resolve(out)
  if _is_folder(out):
    return p / "manifest.json"
  return p.parent / (p.name.removesuffix(".safetensors") + ".manifest.json")


def _evaluation(workdir, step: int) -> dict:
  """The figures of `workdir`'s evaluation report (eval.py's default place) if it is of `step`."""
  report = epath.Path(workdir) / "eval" / "report.json"
  rep = json.loads(report.read_text()) if report.exists() else {}
  if rep.get("step") != step:
    return {}
  ev = {k: rep[k] for k in EVALUATION_KEYS if k in rep}
  if rep.get("hardware_energy"):   # eval.py's energy models (docs/energy.md), stem included
    ev["energy_mj_per_image_by_model"] = {m: v["total_mj"] for m, v in rep["hardware_energy"]["models"].items()}
  return ev


def export(workdir, out, step: int | None = None, *, platforms=("cpu",), programs: tuple | None = None) -> str:
  """Writes the newest (or `step`) checkpoint's model and config of `workdir` to `out`.

  `out` ending in `.safetensors`: that file; beside it `manifest_path(out)` and a `jax.export`
  program per mode, `NAME.MODE.jaxexport`. Any other `out` is a folder for a model hub:
  `model.safetensors`, `model.MODE.jaxexport`, `config.json`, `manifest.json` and a README.md
  model card.

  The manifest holds every file's sha256, the step, the config, the metrics the run evaluated
  (its `summary.json`, when the exported step is the one it evaluated), the figures of the
  evaluation report of that step (`workdir/eval/report.json`, eval.py's), the input the programs
  take, and the package and JAX versions, so a ported checkpoint can be checked against what it
  scored here. `programs`: the modes to serialize (default: the network's evaluation modes; `()`
  for none), each lowered for `platforms` (CPU always; add "cuda", "rocm" or "tpu": no such
  device is needed to lower for it).
  """
  platforms = serving.check_platforms(platforms)
  model, cfg, step = _model_from_workdir(workdir, step)
  modes = model.cfg.eval_modes if programs is None else tuple(programs)
  folder = _is_folder(out)
  dest = paths.resolve(out) / WEIGHTS_FILE if folder else paths.resolve(out)
  dest.parent.mkdir(parents=True, exist_ok=True)
  stem = dest.name.removesuffix(".safetensors")
  flat = {k: np.asarray(v) for k, v in saved_config.flat(jax.device_get(nnx.to_pure_dict(nnx.state(model)))).items()}
  data = safetensors_to_bytes(flat, metadata={"config": cfg.to_json(), "step": str(step), "format": EXPORT_FORMAT})
  dest.write_bytes(data)
  spec = serving.input_spec(model)
  norm = cfg.data.get("norm")
  manifest = {"file": dest.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "step": step,
              "ge2mst_jax": __version__, "jax": jax.__version__, "params": count_params(model),
              "num_classes": model.num_classes, "config": json.loads(cfg.to_json()),
              "input": {"shape": ["b", *spec.shape[1:]], "dtype": "float32",
                        "mean": list(transforms.MEAN.get(norm, ())), "std": list(transforms.STD.get(norm, ()))},
              "programs": {}}
  for mode in modes:
    blob = serving.export_inference(model, mode, platforms, cfg.get("eval_matmul_precision", "highest")).serialize()
    name = f"{stem}.{mode}.jaxexport"
    (dest.parent / name).write_bytes(bytes(blob))
    manifest["programs"][mode] = {"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "platforms": list(platforms),
                                  "output": "logits" if model.num_classes else "pre_logits"}
  summary = epath.Path(workdir) / "summary.json"
  metrics = json.loads(summary.read_text()) if summary.exists() else {}
  manifest["metrics"] = {k: v for k, v in metrics.items() if k != "workdir"} if metrics.get("step") == step else {}
  manifest["evaluation"] = _evaluation(workdir, step)
  if folder:
    saved_config.save(cfg, dest.parent)
    paths.write_text_atomic(dest.parent / "README.md", model_card.model_card(manifest))
  paths.write_text_atomic(manifest_path(out), json.dumps(manifest, indent=2))
  return str(out)
