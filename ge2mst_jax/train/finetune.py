"""Starting a run from another run's weights (e.g. ImageNet -> CIFAR / CIFAR10-DVS).

Every parameter and BatchNorm statistic whose path and shape match is copied; the rest
(a new classifier, the event-frame input adapter) keeps its fresh initialisation. The
optimizer starts anew. What was not loaded is reported by path.
"""
from __future__ import annotations

import logging

import jax
from flax import nnx

from ge2mst_jax.train import checkpoint as ckpt_lib


def load_matching(target: dict, source: dict, reset_head: bool = True) -> tuple[dict, list, list]:
  """Copies `source` leaves into `target` where path and shape match; returns (merged, loaded, skipped)."""
  loaded, skipped = [], []

  def walk(t, s, path):
    s = {str(k): v for k, v in s.items()} if isinstance(s, dict) else {}  # saved keys may be str or int
    out = {}
    for k, v in t.items():
      p, sv = f"{path}/{k}" if path else str(k), s.get(str(k))
      if isinstance(v, dict):
        out[k] = walk(v, sv, p)
      elif getattr(sv, "shape", None) == v.shape and not (reset_head and p.startswith("classifier")):
        out[k] = sv
        loaded.append(p)
      else:
        out[k] = v
        skipped.append(p)
    return out

  return walk(target, source, ""), loaded, skipped


def load_pretrained(cfg, setup, state):
  """Replaces the model part of a fresh train state with matching weights from `cfg.init_from.checkpoint`."""
  src_dir = cfg.init_from.checkpoint
  step, src = ckpt_lib.restore_as_saved(src_dir)   # named {"model", "optimizer"}, whichever format it was
  pure = nnx.to_pure_dict(state)
  pure["model"], loaded, skipped = load_matching(pure["model"], src["model"], cfg.init_from.reset_head)
  pure = jax.tree.map(jax.device_put, pure, nnx.to_pure_dict(setup.shardings))
  nnx.replace_by_pure_dict(state, pure)
  msg = (f"Fine-tuning from {src_dir} (step {step}): loaded {len(loaded)} arrays; kept fresh "
         f"{len(skipped)}: {', '.join(skipped[:12])}{' ...' if len(skipped) > 12 else ''}")
  logging.warning(msg)
  print(msg, flush=True)
  return state
