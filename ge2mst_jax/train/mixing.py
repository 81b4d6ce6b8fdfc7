"""Mixup and CutMix in the train step, with partners from the same data shard.

Each image is mixed with the image at the mirrored position of its own shard of the global
batch (`shard_local_reverse`), so pairing needs no cross-device gather: on a pod the global
batch never leaves the chips that hold it. The pairing is deterministic for a given mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def shard_local_reverse(mesh, axes):
  """`x -> x` with each device's block of the leading (batch) axis reversed in place."""
  spec = P(axes)
  return jax.shard_map(lambda x: x[::-1], mesh=mesh, in_specs=spec, out_specs=spec)


def augmentation_key(seed: int) -> jax.Array:
  """The run's augmentation stream; step `s` uses `fold_in(augmentation_key(seed), s)`.

  Its own stream: `nnx.Rngs(seed)` initialises the weights with `fold_in(key(seed), i)`, so
  `fold_in(key(seed), step)` would hand step i the key that drew the i-th initial weights.
  """
  return jax.random.split(jax.random.key(seed))[1]


def mix(images, labels, rng, mixup: float, cutmix: float, partners=lambda x: x[::-1]):
  """Mixup or CutMix (chosen 50/50 when both are on) with one lambda per batch.

  `partners(x)` returns, for every example, the example it is mixed with (a permutation of
  the batch axis); labels are mixed with the same lambda as the images.
  """
  if mixup <= 0 and cutmix <= 0:
    return images, labels
  k_choice, k_lam, k_box = jax.random.split(rng, 3)
  use_cut = (cutmix > 0) & ((mixup <= 0) | jax.random.bernoulli(k_choice))
  lam = jax.random.beta(k_lam, *(2 * [jnp.where(use_cut, max(cutmix, 1e-3), max(mixup, 1e-3))]))
  H, W = images.shape[1:3]
  cut = jnp.sqrt(1 - lam)
  ch, cw = (H * cut).astype(jnp.int32), (W * cut).astype(jnp.int32)
  cy, cx = jax.random.randint(k_box, (2,), 0, jnp.asarray([H, W]))
  ys, xs = jnp.arange(H)[:, None], jnp.arange(W)[None, :]
  box = (jnp.abs(ys - cy) <= ch // 2) & (jnp.abs(xs - cx) <= cw // 2)
  box = box.reshape((1, H, W) + (1,) * (images.ndim - 3))
  lam_cut = 1 - jnp.mean(box)
  other = partners(images)
  images = jnp.where(use_cut, jnp.where(box, other, images), lam * images + (1 - lam) * other)
  lam = jnp.where(use_cut, lam_cut, lam)
  return images, lam * labels + (1 - lam) * partners(labels)
