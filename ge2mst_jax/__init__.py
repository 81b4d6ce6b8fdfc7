"""ge2mst_jax: the Ge2mS-T spiking vision transformer in JAX / Flax NNX.

Subpackages, each importing only those below it (tests/test_structure.py checks it):

  evaluate/  reports, SOPs and energy, the spike-driven audit
  weights    `load` / `export`: trained weights for other pipelines
  train/     train state, step and loop, checkpoints, sharding, run control
  nn/        synaptic layers, blocks, GW-SSA and its kernel, the network family
  prepare/   the paper's data sets from the downloaded files (`python -m ge2mst_jax.prepare`)
  data/      tfds + grain pipelines, transforms, augmentation
  spiking/   ExpG-IF and the LIF/STBP baseline: the neuron mathematics
  io/        paths, errors, saved configs, entry-point helpers

Names are resolved on first use: `import ge2mst_jax.io.hugepages` (what train.py does before
it may re-execute itself) costs no JAX import, `create_model` costs the network only, and `load` /
`export` bring in checkpointing when called.
"""
import importlib

__version__ = "1.0.0"
_LAZY = {
    "create_model": "ge2mst_jax.nn.models",
    **{name: "ge2mst_jax.spiking.neurons" for name in ("ExpGIF", "SpikeTrain", "alpha_schedule", "expg_levels",
                                                        "expg_quantize", "expg_spikes", "progressive_activation")},
    "eval_transform": "ge2mst_jax.data.transforms",
    "export": "ge2mst_jax.weights",
    "load": "ge2mst_jax.weights",
    "to_linen": "ge2mst_jax.nn.linen",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'ge2mst_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
