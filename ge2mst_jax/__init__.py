"""ge2mst_jax: the Ge2mS-T spiking vision transformer in JAX / Flax NNX.

The neuron and the network import eagerly; `load` and `export` (and with them orbax and the
training stack) only when first used, so `import ge2mst_jax` costs what the model costs.
"""
import importlib

from ge2mst_jax.models import create_model
from ge2mst_jax.neurons import (ExpGIF, SpikeTrain, alpha_schedule, expg_levels, expg_quantize, expg_spikes,
                                progressive_activation)

__version__ = "0.1.0"
_LAZY = {"export": "ge2mst_jax.weights", "load": "ge2mst_jax.weights"}

__all__ = ["ExpGIF", "SpikeTrain", "alpha_schedule", "create_model", "expg_levels", "expg_quantize", "expg_spikes",
           "export", "load", "progressive_activation"]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'ge2mst_jax' has no attribute {name!r}")
