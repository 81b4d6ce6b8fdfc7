"""The forward context: what one pass of the network is, decided once and handed to every layer.

`Forward.of(mode, alpha, collect)` is built by the network's `__call__` (or by a test calling one
layer) and passed down unchanged, so no layer re-derives a property of the pass. It is a pytree
whose only leaf is `alpha` (a traced schedule value in the train step); the mode, the statistics
flag and whether neuron outputs lie on their grids are static, so a rematerialised block sees
the same decisions as a plain one.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax

MODES = ("quantize", "spike", "stbp")


def static_alpha(alpha) -> float | None:
  """`alpha` as a Python float if it is known while tracing (a Python, numpy or concrete JAX
  scalar), else None (a traced value, as in the train step's schedule)."""
  if isinstance(alpha, jax.core.Tracer):   # asked first: float() of a tracer raises an error whose
    return None                             # message walks the whole program traced so far
  try:
    return float(alpha)
  except TypeError:   # not a scalar
    return None


@flax.struct.dataclass
class Forward:
  """One forward pass. Build it with `Forward.of`, which validates the mode and derives `on_grid`.

  mode: 'quantize' (ExpG-IF quantizers; training, and evaluation of the ANN the network is),
    'spike' (T-step spike trains; inference) or 'stbp' (LIF over T steps; the baseline paradigm).
  alpha: the progressive activation's blend (1: the exact quantizer); a Python or traced scalar.
  collect: sow spike counts, SOPs and MACs into `SpikeStats` (the energy report's pass).
  on_grid: every ExpG-IF output lies exactly on its neuron's grid (`code * lam / Z`): quantize
    mode at an alpha known to be >= 1 while tracing (evaluation). Synaptic layers and attention
    products then compute on the integer codes and scale once, as spike mode does, so that the two
    modes give the same bits. False for a traced alpha, which cannot be known to be 1.
  """
  mode: str = flax.struct.field(pytree_node=False)
  alpha: Any
  collect: bool = flax.struct.field(pytree_node=False)
  on_grid: bool = flax.struct.field(pytree_node=False)

  @classmethod
  def of(cls, mode: str = "quantize", alpha=1.0, collect: bool = False) -> "Forward":
    if mode not in MODES:
      raise ValueError(f"Unknown mode {mode!r}: use 'quantize' (training), 'spike' (inference) or 'stbp' "
                       f"(the LIF baseline).")
    return cls(mode, alpha, bool(collect), mode == "quantize" and (static_alpha(alpha) or 0.0) >= 1)

  def unit(self, neuron, dtype) -> jax.Array | None:
    """The grid unit (`lam / Z` in `dtype`) of `neuron`'s output when it lies on its grid (`on_grid`),
    else None: what a synaptic layer fed by that neuron needs to compute on the integer codes."""
    return neuron.code_unit(dtype) if self.on_grid else None
