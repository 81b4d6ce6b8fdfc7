"""ge2mst_jax: the Ge2mS-T spiking vision transformer in JAX / Flax NNX."""
from ge2mst_jax.neurons import (ExpGIF, SpikeTrain, alpha_schedule, expg_levels, expg_quantize,
                                expg_spikes, progressive_activation)

__version__ = "0.1.0"
from ge2mst_jax.export import export, load
from ge2mst_jax.models import create_model

__all__ = ["ExpGIF", "SpikeTrain", "alpha_schedule", "create_model", "expg_levels", "expg_quantize", "expg_spikes",
           "export", "load", "progressive_activation"]
