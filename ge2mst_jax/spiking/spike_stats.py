"""The collection that spiking layers sow their statistics into (a leaf: every layer imports it)."""
from flax import nnx


class SpikeStats(nnx.Intermediate):
  """Spike counts, synaptic operations and MACs sown during an instrumented pass (`collect=True`);
  `energy.py` reads them back."""
