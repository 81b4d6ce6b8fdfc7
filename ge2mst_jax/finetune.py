"""Starting a run from another run's weights (e.g. ImageNet -> CIFAR / CIFAR10-DVS).

Every parameter and BatchNorm statistic whose path and shape match is copied; the rest
(a new classifier, the event-frame input adapter) keeps its fresh initialisation. The
optimizer starts anew. What was not loaded is reported by path.
"""
from __future__ import annotations

import logging

import jax
from flax import nnx

from ge2mst_jax import checkpoint as ckpt_lib


def load_matching(target: dict, source: dict, reset_head: bool = True, prefix: str = "") -> tuple[dict, list, list]:
  """Copies `source` leaves into `target` where path and shape match; returns (merged, loaded, skipped)."""
  loaded, skipped = [], []

  def walk(t, s, path):
    out = {}
    for k, v in t.items():
      p = f"{path}/{k}" if path else str(k)
      sv = s.get(k) if isinstance(s, dict) else None
      if sv is None and isinstance(s, dict):
        sv = s.get(str(k), s.get(int(k)) if str(k).isdigit() else None)
      if isinstance(v, dict):
        out[k] = walk(v, sv if isinstance(sv, dict) else {}, p)
      elif sv is not None and getattr(sv, "shape", None) == v.shape and not (reset_head and p.startswith("classifier")):
        out[k] = sv
        loaded.append(p)
      else:
        out[k] = v
        skipped.append(p)
    return out

  return walk(target, source, prefix), loaded, skipped


def load_pretrained(cfg, setup, state):
  """Replaces the model part of a fresh train state with matching weights from `cfg.init_from.checkpoint`."""
  src_dir = cfg.init_from.checkpoint
  pure = nnx.to_pure_dict(state)
  # Restore the source's model weights without knowing its shapes: read them as saved.
  import orbax.checkpoint as ocp
  directory = src_dir.rstrip("/")
  candidates = [directory, f"{directory}/checkpoints"]
  mngr = None
  for d in candidates:
    try:
      m = ocp.CheckpointManager(d, item_names=("state", "data"), options=ocp.CheckpointManagerOptions(read_only=True))
      if m.latest_step() is not None:
        mngr = m
        break
      m.close()
    except (FileNotFoundError, ValueError):
      continue
  if mngr is None:
    raise ckpt_lib.CheckpointError(f"init_from.checkpoint={src_dir!r} holds no checkpoint written by train.py.")
  step = mngr.latest_step()
  try:
    src = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    mngr.close()
  model_key = next(k for k in pure if str(k) == "0")
  src_model = src.get(model_key, src.get("0", src.get(0)))
  merged, loaded, skipped = load_matching(pure[model_key], src_model, cfg.init_from.reset_head)
  pure[model_key] = merged
  pure = jax.tree.map(lambda x, s: jax.device_put(x, s), pure, nnx.to_pure_dict(setup.shardings))
  nnx.replace_by_pure_dict(state, pure)
  msg = (f"Fine-tuning from {src_dir} (step {step}): loaded {len(loaded)} arrays; kept fresh "
         f"{len(skipped)}: {', '.join(skipped[:12])}{' ...' if len(skipped) > 12 else ''}")
  logging.warning(msg)
  print(msg, flush=True)
  return state
