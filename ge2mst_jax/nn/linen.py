"""The network as a Linen module (flax's NNX -> Linen bridge), for Linen code bases such as
big_vision and scenic.

    module, variables = to_linen(model)        # a created or `ge2mst_jax.load`-ed network
    logits = module.apply(variables, images, mode="spike")
    logits, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])

Parameters (weights, biases, ExpG-IF thresholds) are the `params` collection, BatchNorm's
running statistics `batch_stats`, under the NNX paths (`stages/1/0/conv/kernel`). `train=True`
normalises with batch statistics and, with `batch_stats` mutable, returns their update;
`train=False` (the default) is inference, which spike mode requires. `features=True` returns
`Ge2msT.features`' `(logits, out)`.
"""
from __future__ import annotations

from flax import nnx, traverse_util
from flax.nnx import bridge
from flax.nnx import variablelib

from ge2mst_jax.nn.models import ArchConfig, Ge2msT


def _run(network: Ge2msT, images, *, mode: str, train: bool, alpha, features: bool):
  # The bridge builds the NNX network anew on every call (in training mode, as created): the
  # call says which BatchNorm statistics to use, as Linen modules take a `train` argument.
  network.train() if train else network.eval()
  if features:
    return network.features(images, mode=mode, alpha=alpha)
  return network(images, mode=mode, alpha=alpha)


class Ge2msTLinen(bridge.ToLinen):
  """`Ge2msT` as a Linen module; build it with `to_linen` or `linen_module`."""

  def __call__(self, images, *, mode: str = "quantize", train: bool = False, alpha=1.0, features: bool = False):
    return super().__call__(images, nnx_method=_run, mode=mode, train=train, alpha=alpha, features=features)


def linen_module(arch: ArchConfig, num_classes: int = 1000) -> Ge2msTLinen:
  """The Linen module of the network `arch` describes (`module.init(key, images)` initialises it)."""
  return Ge2msTLinen(nnx_class=Ge2msT, args=(arch, num_classes))


def linen_variables(network: Ge2msT) -> dict:
  """`{"params": ..., "batch_stats": ...}` of an NNX network, as its Linen module holds them."""
  cols = {}
  for path, v in nnx.to_flat_state(nnx.state(network, nnx.Not(nnx.RngState))):
    col = variablelib.variable_name_from_type(type(v), allow_register=True)
    cols.setdefault(col, {})[path] = v.get_value()
  return {col: traverse_util.unflatten_dict(flat) for col, flat in cols.items()}


def to_linen(network: Ge2msT) -> tuple[Ge2msTLinen, dict]:
  """`(module, variables)`: the Linen module of `network`'s architecture and its current values."""
  if network.features_only:
    raise ValueError("to_linen takes a network with a classifier or num_classes=0; call features=True on the "
                     "module for the stage maps.")
  return linen_module(network.cfg, network.num_classes), linen_variables(network)
