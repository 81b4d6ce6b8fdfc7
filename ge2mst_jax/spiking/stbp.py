"""The STBP baseline: a multi-step LIF neuron trained by backpropagation through time.

This is how Spikformer and its successors train (SpikingJelly's multi-step LIF with a
surrogate gradient): every layer sees `(T, B, ...)` tensors, the neuron scans its
membrane over the T steps, and the gradient flows back through that scan. The paper's
Table 1 contrasts it with ExpG-IF, whose training graph has no time axis at all;
`benchmarks/paradigms.py` measures both on the same network (`ArchConfig.paradigm`).

Dynamics (decay_input, reset to 0), for input current `x_t`:
    h_t = v_{t-1} + (x_t - v_{t-1}) / tau
    s_t = H(h_t - v_th)                          (Heaviside; surrogate derivative)
    v_t = h_t - s_t v_th        (soft reset)  or  h_t (1 - s_t)   (hard reset)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.spike_stats import SpikeStats

SURROGATES = ("sigmoid", "atan")
RESETS = ("soft", "hard")


PARADIGMS = ("expg", "stbp")


@dataclasses.dataclass(frozen=True)
class Baseline:
  """The training paradigm and the LIF neuron of its STBP baseline, checked here once (`LIF` builds
  one too). 'expg': ExpG-IF quantizers, the paper; 'stbp': multi-step LIF + BPTT, whose options
  below are read (and checked) only then."""
  paradigm: str = "expg"
  lif_tau: float = 2.0                        # stbp: membrane time constant
  lif_threshold: float = 0.5                  # stbp: firing threshold v_th (at 1.0 a fresh net barely fires)
  lif_reset: str = "soft"                     # stbp: 'soft' (subtract v_th) | 'hard' (to 0)
  surrogate: str = "sigmoid"                  # stbp: surrogate gradient 'sigmoid' | 'atan'
  surrogate_alpha: float = 4.0                # stbp: surrogate sharpness

  def __post_init__(self):
    if self.paradigm not in PARADIGMS:
      raise ValueError(f"paradigm={self.paradigm!r}: use one of {PARADIGMS}.")
    if self.paradigm != "stbp":
      return
    if not self.lif_tau >= 1:
      raise ValueError(f"lif_tau={self.lif_tau} must be >= 1 (tau=1 is an IF neuron without leak memory).")
    for name, choices in (("lif_reset", RESETS), ("surrogate", SURROGATES)):
      if getattr(self, name) not in choices:
        raise ValueError(f"STBP option {name}={getattr(self, name)!r}: use one of {choices}.")


def surrogate_grad(u: jax.Array, kind: str, alpha: float) -> jax.Array:
  """d spike / d u of the smooth stand-in for the Heaviside step at `u = h - v_th`."""
  if kind == "sigmoid":
    sg = jax.nn.sigmoid(alpha * u)
    return alpha * sg * (1 - sg)
  if kind == "atan":
    return alpha / 2 / (1 + (jnp.pi / 2 * alpha * u) ** 2)
  raise ValueError(f"Unknown surrogate {kind!r}: use one of {SURROGATES}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def heaviside(u: jax.Array, kind: str = "sigmoid", alpha: float = 4.0) -> jax.Array:
  """`1[u >= 0]` in the forward pass, the surrogate's derivative in the backward pass."""
  return (u >= 0).astype(u.dtype)


heaviside.defvjp(lambda u, kind, alpha: (heaviside(u, kind, alpha), u),
                 lambda kind, alpha, u, g: (g * surrogate_grad(u, kind, alpha).astype(g.dtype),))


def lif_step(v, x, *, tau: float, v_th: float, reset: str, surrogate: str, alpha: float):
  """One LIF step: `(v_{t-1}, x_t) -> (v_t, s_t)`."""
  h = v + (x - v) * (1.0 / tau)
  s = heaviside(h - v_th, surrogate, alpha)
  if reset == "soft":
    v = h - s * v_th
  elif reset == "hard":
    v = h * (1 - s)
  else:
    raise ValueError(f"Unknown LIF reset {reset!r}: use one of {RESETS}.")
  return v, s


def lif_scan(x: jax.Array, *, tau: float = 2.0, v_th: float = 1.0, reset: str = "soft",
             surrogate: str = "sigmoid", alpha: float = 4.0) -> jax.Array:
  """Binary spikes `(T, ...)` of a LIF neuron driven by currents `x` `(T, ...)`, membrane from 0.

  A `lax.scan`: the backward pass runs through every step (BPTT), so training memory
  holds the membrane of all T steps.
  """
  step = functools.partial(lif_step, tau=tau, v_th=v_th, reset=reset, surrogate=surrogate, alpha=alpha)
  _, spikes = jax.lax.scan(step, jnp.zeros_like(x[0]), x)
  return spikes


class LIF(nnx.Module):
  """A multi-step LIF layer: `(T, B, ...)` currents in, `(T, B, ...)` binary spikes out.

  Runs only in `mode='stbp'`. `symmetric` is accepted so the network can build it where an
  ExpG-IF layer would be ternary; LIF spikes are binary, as in Spikformer.
  """

  def __init__(self, T: int = 4, tau: float = 2.0, threshold: float = 1.0, reset: str = "soft",
               surrogate: str = "sigmoid", surrogate_alpha: float = 4.0, symmetric: bool = False):
    del symmetric
    Baseline("stbp", tau, threshold, reset, surrogate, surrogate_alpha)   # checks the options
    self.T, self.tau, self.v_th, self.reset = T, float(tau), float(threshold), reset
    self.surrogate, self.alpha = surrogate, float(surrogate_alpha)

  def __call__(self, x, ctx: Forward):
    # ctx.alpha is not read: progressive activation belongs to ExpG-IF.
    if ctx.mode != "stbp":
      raise ValueError(f"A LIF (STBP) network runs only in mode='stbp', not {ctx.mode!r}.")
    if x.shape[0] != self.T:
      raise ValueError(f"LIF layer built for T={self.T} got {x.shape[0]} time steps (input shape {x.shape}).")
    spikes = lif_scan(x, tau=self.tau, v_th=self.v_th, reset=self.reset, surrogate=self.surrogate,
                      alpha=self.alpha)
    if ctx.collect:
      self.sow(SpikeStats, "spike_count", jnp.sum(spikes, dtype=jnp.float32))
      self.sow(SpikeStats, "neurons", jnp.asarray(x[0].size, jnp.float32))
    return spikes
