"""A one-screen demonstration of the ExpG-IF neuron: level sets, spikes, exact decoding.

Run: python examples/demo.py [T]
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ge2mst_jax.spiking import neurons


def main(T: int = 4) -> None:
  print(f"ExpG-IF level sets for T={T} (levels are code/Z of lambda; pattern = spike per step t=1..T)")
  for K in range(1, T + 1):
    ls = neurons.expg_levels(T, K)
    pats = " ".join("".join(map(str, p)) for p in ls.patterns)
    print(f"  K={K}: |L|={len(ls.codes):3d} Z={ls.Z:3d} codes={ls.codes.tolist()}")
    print(f"        patterns {pats}")
  lam, K = 1.5, min(2, T)
  x = jax.random.uniform(jax.random.key(0), (100_000,), minval=-1.0, maxval=2.5)
  q = neurons.expg_quantize(x, lam, T, K)
  spikes, thetas = neurons.expg_spikes(x, lam, T, K)
  decoded = neurons.SpikeTrain(spikes, neurons.code_scale(lam, T, K)).decode()
  bitwise = bool(jnp.all(jax.lax.bitcast_convert_type(decoded, jnp.int32)
                         == jax.lax.bitcast_convert_type(q, jnp.int32)))
  print(f"\n{x.size} random inputs, lambda={lam}, T={T}, K={K}:")
  print(f"  thetas (post-firing thresholds) = {np.round(np.asarray(thetas), 4).tolist()}")
  print(f"  spikes decode to the quantizer bitwise: {bitwise}")
  print(f"  max spikes per neuron: {int(spikes.sum(0).max())} (K={K}); mean firing rate "
        f"{float(spikes.mean()):.3f} per neuron-step")
  for xi in (-0.3, 0.2, 0.7, 1.1, 9.0):
    s, _ = neurons.expg_spikes(jnp.asarray([xi]), lam, T, K)
    print(f"  x={xi:5.2f} -> Q(x)={float(neurons.expg_quantize(jnp.asarray(xi), lam, T, K)):.4f} "
          f"spikes={''.join(str(int(v)) for v in s[:, 0])}")


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
