"""The train state: model and optimizer built from a config, sharded over the mesh, or restored.

The whole state is one `nnx.State` pytree with two named parts: `{"model": ..., "optimizer": ...}`
(model parameters, BatchNorm statistics and thresholds; the `nnx.Optimizer`'s step and optax
state), split from the dict of the two objects, and saved in checkpoints under the same names.
`model_and_optimizer` takes a state apart, `state_of` puts it together again. It is created
already sharded by `jax.jit(..., out_shardings=...)`, or read from a checkpoint straight into
those shardings: a resumed pod job neither compiles nor runs the initialisation, a program of its
own whose compile alone takes seconds even for a small network.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from ge2mst_jax.train import checkpoint as ckpt_lib
from ge2mst_jax.train import programs
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.nn.models import arch_from_config, model_from_config


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


def state_of(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.State:
  """The train state of `model` and `optimizer`: `{"model": ..., "optimizer": ...}`."""
  return nnx.state({"model": model, "optimizer": optimizer})


def model_and_optimizer(graphdef, state) -> tuple[nnx.Module, nnx.Optimizer]:
  """`(model, optimizer)` of a train state (`graphdef`: the setup's), the one way to take it apart."""
  train = nnx.merge(graphdef, state)
  return train["model"], train["optimizer"]


@dataclasses.dataclass
class TrainSetup:
  graphdef: Any
  state: Any               # nnx.State {"model", "optimizer"}, sharded; None until initialised or restored
  shardings: Any
  abstract: Any
  mesh: jax.sharding.Mesh


def _build_fn(cfg):
  tx = make_optimizer(cfg)

  def build():
    model = model_from_config(cfg)
    return {"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}
  return build


@programs.reused
def _abstract_state(cfg, mesh):
  graphdef, abstract = nnx.split(nnx.eval_shape(_build_fn(cfg)))
  return graphdef, abstract, shd.state_shardings(abstract, mesh)


def abstract_train_state(cfg, mesh) -> TrainSetup:
  """Shapes, dtypes and shardings of the train state, without computing it (`state` is None)."""
  graphdef, abstract, shardings = _abstract_state(cfg, mesh)
  return TrainSetup(graphdef, None, shardings, abstract, mesh)


@programs.reused
def _init_program(cfg, setup: TrainSetup):
  build = _build_fn(cfg)
  return jax.jit(lambda: nnx.split(build())[1], out_shardings=setup.shardings)


def initialize(cfg, setup: TrainSetup) -> TrainSetup:
  """Fills `setup.state` with a fresh state, created already sharded by one jitted program."""
  with jax.set_mesh(setup.mesh):
    setup.state = _init_program(cfg, setup)()
  return setup


def fill(setup: TrainSetup, pure: dict) -> TrainSetup:
  """Fills `setup.state` with restored arrays (`pure`: laid out like `nnx.to_pure_dict`)."""
  state = jax.tree.map(lambda x: x, setup.abstract)   # a new State, not the abstract one
  nnx.replace_by_pure_dict(state, pure)
  setup.state = state
  return setup


def create_train_state(cfg, mesh) -> TrainSetup:
  return initialize(cfg, abstract_train_state(cfg, mesh))


def restore_train_state(cfg, checkpoint_dir: str, mesh, step: int | None = None,
                        fallback: bool = True) -> tuple[TrainSetup, int]:
  """A train state for `cfg` on `mesh`, read from `checkpoint_dir` (any mesh may have written it).

  Nothing is initialised: the checkpoint's arrays are read straight into their shardings, so a
  restore costs no initialisation compile or run.
  """
  setup = abstract_train_state(cfg, mesh)
  step, pure = ckpt_lib.restore_state_only(checkpoint_dir, ckpt_lib.abstract_pure(setup.abstract, setup.shardings),
                                           step, fallback)
  return fill(setup, pure), step
