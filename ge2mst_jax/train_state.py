"""The train state: model and optimizer built from a config, sharded over the mesh, or restored.

The whole state (model parameters, BatchNorm statistics, optimizer state and step) is one
`nnx.State` pytree, created already sharded by `jax.jit(..., out_shardings=...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from ge2mst_jax import checkpoint as ckpt_lib
from ge2mst_jax import sharding as shd
from ge2mst_jax.models import arch_from_config, model_from_config


def eval_modes(cfg) -> tuple:
  """The modes evaluated after training: `cfg.eval_modes` for ExpG-IF, the network itself for STBP."""
  arch = arch_from_config(cfg)
  return arch.eval_modes if arch.paradigm == "stbp" else tuple(cfg.eval_modes)


def learning_rate_schedule(cfg) -> optax.Schedule:
  o = cfg.optimizer
  peak = o.lr * cfg.batch_size / o.base_batch_size   # linear scaling rule
  warmup = min(o.warmup_steps, max(cfg.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.total_steps, warmup + 1),
                                            end_value=peak * o.min_lr_ratio)


def make_optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optimizer
  # No weight decay on thresholds, BatchNorm and biases (1-D or scalar parameters).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  if o.name == "adamw":
    chain.append(optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
  elif o.name == "sgd":  # momentum SGD with decoupled weight decay
    chain += [optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
              optax.sgd(learning_rate_schedule(cfg), momentum=o.b1, nesterov=True)]
  else:
    raise ValueError(f"optimizer.name={o.name!r}: use 'adamw' or 'sgd'.")
  return optax.chain(*chain)


@dataclasses.dataclass
class TrainSetup:
  graphdef: Any
  state: Any               # nnx.State of (model, optimizer), sharded
  shardings: Any
  abstract: Any
  mesh: jax.sharding.Mesh


def create_train_state(cfg, mesh) -> TrainSetup:
  tx = make_optimizer(cfg)

  def build():
    model = model_from_config(cfg)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  shardings = shd.state_shardings(abstract, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
  return TrainSetup(graphdef, state, shardings, abstract, mesh)


def restore_train_state(cfg, checkpoint_dir: str, mesh, step: int | None = None,
                        fallback: bool = True) -> tuple[TrainSetup, int]:
  """A train state for `cfg` on `mesh`, filled from `checkpoint_dir` (any mesh may have written it)."""
  setup = create_train_state(cfg, mesh)
  step, pure = ckpt_lib.restore_state_only(checkpoint_dir, ckpt_lib.abstract_pure(setup.abstract, setup.shardings),
                                           step, fallback)
  nnx.replace_by_pure_dict(setup.state, pure)
  return setup, step
