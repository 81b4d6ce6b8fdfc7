"""ge2mst_jax: the Ge2mS-T spiking vision transformer in JAX / Flax NNX.

Names are resolved on first use: `import ge2mst_jax.cli` (what train.py does before it
re-executes itself) costs no JAX import, `create_model` costs the network only, and `load` /
`export` bring in checkpointing when called.
"""
import importlib

__version__ = "0.1.0"
_LAZY = {
    "create_model": "ge2mst_jax.models",
    **{name: "ge2mst_jax.neurons" for name in ("ExpGIF", "SpikeTrain", "alpha_schedule", "expg_levels",
                                                "expg_quantize", "expg_spikes", "progressive_activation")},
    "eval_transform": "ge2mst_jax.transforms",
    "export": "ge2mst_jax.weights",
    "load": "ge2mst_jax.weights",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'ge2mst_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
