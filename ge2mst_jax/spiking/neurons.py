"""ExpG-IF: the grouped-exponential-coding integrate-and-fire neuron (docs/math.md#the-expg-if-neuron).

Training sees the neuron as a non-uniform quantizer `Q`; inference runs it as a
spike emitter over `T` steps whose spikes decode to `Q` bit for bit. Both are
built on one integer function, `expg_code`, so the two can never disagree: the
quantizer's output is *defined* as `code * (lam / Z)`, and the spike train of a
neuron is the binary expansion of that same code.

The math lives here as pure functions (jit/vmap/grad-able); `ExpGIF` is the thin
Flax NNX module that the network uses wherever a neuron stands.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.spike_stats import SpikeStats

MAX_T = 16  # level tables grow as 2^T; 16 steps is far beyond any published SNN setting.


# ----------------------------------------------------------------------------
# Level sets
# ----------------------------------------------------------------------------
def check_tk(T: int, K: int) -> None:
  """Raises a one-line ValueError unless 1 <= K <= T <= MAX_T."""
  if not isinstance(T, (int, np.integer)) or not 1 <= T <= MAX_T:
    raise ValueError(f"ExpG-IF time steps T={T!r} is out of range: use an integer 1 <= T <= {MAX_T}.")
  if not isinstance(K, (int, np.integer)) or not 1 <= K <= T:
    raise ValueError(f"ExpG-IF groups K={K!r} is out of range for T={T}: use an integer 1 <= K <= T.")


def step_bases(T: int) -> np.ndarray:
  """`b_t = 2^(T-t)` for t = 1..T: the first step is the most significant."""
  return 2 ** np.arange(T - 1, -1, -1, dtype=np.int64)


def groups(T: int, K: int) -> list[list[int]]:
  """The K interleaved base groups `G_k = {2^(T-k), 2^(T-k-K), ...}` (APoT style)."""
  check_tk(T, K)
  bases = step_bases(T)
  return [[int(b) for b in bases[k::K]] for k in range(K)]


class LevelSet(NamedTuple):
  """The ExpG level set of (T, K), all as exact integers.

  codes: sorted integer codes `c` (a level is `c / Z`).
  patterns: `(|L|, T)` 0/1 spike pattern of each code (binary expansion over steps).
  Z: the normaliser, the largest code.
  """
  codes: np.ndarray
  patterns: np.ndarray
  Z: int

  @property
  def levels(self) -> np.ndarray:
    """Levels as fractions of lambda, in [0, 1]."""
    return self.codes / self.Z

  @property
  def thresholds(self) -> np.ndarray:
    """The `|L| - 1` pre-firing thresholds (fractions of lambda): midpoints of adjacent levels."""
    return (self.codes[:-1] + self.codes[1:]) / (2.0 * self.Z)

  @property
  def doubled_thresholds(self) -> np.ndarray:
    """The thresholds in doubled code units, `c_j + c_{j+1}`: exact integers."""
    return self.codes[:-1] + self.codes[1:]


@functools.lru_cache(maxsize=None)
def expg_levels(T: int, K: int) -> LevelSet:
  """The sorted level set L of ExpG-IF(T, K) with each level's spike pattern.

  `K = 1` is Exp-IF (levels 0 and the powers of two); `K = T` the uniform binary code.
  """
  gs = groups(T, K)
  sums = {sum(choice) for choice in itertools.product(*[[0] + g for g in gs])}
  codes = np.array(sorted(sums), dtype=np.int64)
  bases = step_bases(T)
  patterns = ((codes[:, None] & bases[None, :]) > 0).astype(np.int8)
  return LevelSet(codes=codes, patterns=patterns, Z=int(codes[-1]))


# ----------------------------------------------------------------------------
# The integer code and the quantizer
# ----------------------------------------------------------------------------
METHODS = ("search", "compare", "arith")


def doubled_code_units(x: jax.Array, lam: jax.Array, Z: int) -> jax.Array:
  """`x * (2Z / lam)` in at least float32: the input on the scale where the thresholds are the
  integers `c_j + c_{j+1}`. One rounded product, shared by every method, so the comparisons
  against exact integers give every method the same answer, eagerly and under any rewriting jit."""
  dt = jnp.promote_types(x.dtype, jnp.float32)
  return x.astype(dt) * (jnp.asarray(2 * Z, dt) / jnp.asarray(lam, dt))


def expg_code(x: jax.Array, lam: jax.Array, T: int, K: int, method: str = "search") -> jax.Array:
  """Integer code (int32) of the level nearest to `clip(x / lam, 0, 1)`.

  The level index is the number of pre-firing thresholds `lam * m_j` that `x` has reached
  (ties round up), which clips implicitly; compared as `x (2Z / lam) >= c_j + c_{j+1}`
  (`doubled_code_units`). Three ways to find it, one result: `method='search'`, binary
  search (`jnp.searchsorted`, the paper's inference rule); `'compare'`, counting
  comparisons, elementwise and fusible, at a cost that grows with the `|L| - 1` thresholds
  (24 at T=8, K=2); `'arith'`, the levels just below and above from the integer bits of the
  input and one comparison with the threshold between them, a cost independent of T (for
  K in {1, 2, T}; other K count comparisons). `lam` broadcasts against `x`.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown expg_code method {method!r}: use one of {METHODS}.")
  return code_of_doubled_units(doubled_code_units(x, lam, expg_levels(T, K).Z), T, K, method)


def code_of_doubled_units(v: jax.Array, T: int, K: int, method: str = "search") -> jax.Array:
  """`expg_code` of an input already on the doubled-code scale (`doubled_code_units`)."""
  ls = expg_levels(T, K)
  if method == "arith" and (K in (1, 2) or K == T):
    return _arith_code(v, T, K)
  thr = np.asarray(ls.doubled_thresholds, v.dtype)
  if method == "search":
    return jnp.asarray(ls.codes, jnp.int32)[jnp.searchsorted(jnp.asarray(thr), v, side="right")]
  # code = sum_j [v >= thr_j] * (c_{j+1} - c_j): elementwise and fusible, no gather.
  code = jnp.zeros(v.shape, jnp.int32)
  for t, step in zip(thr, np.diff(ls.codes).astype(np.int32)):
    code = code + jnp.where(v >= t, step, 0)
  return code


def _top_bit(v: jax.Array) -> jax.Array:
  """floor(log2 v) of int32 `0 < v < 2^24` from the exponent of its exact float32; -127 for 0."""
  return (jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32) >> 23) - 127


def _pow2(p: jax.Array) -> jax.Array:
  """2^p for int32 p >= 0, 0 where p < 0."""
  return jnp.where(p >= 0, jnp.left_shift(1, jnp.maximum(p, 0)), 0)


def _arith_code(v, T: int, K: int):
  """The nearest-level code of doubled code units `v`, for K in {1, 2, T}, without a search.

  A level of ExpG(T, K) is a T-bit integer with at most one set bit in each class of bit
  positions mod K. The largest level `lo <= floor(v / 2)` (clipped to [0, Z]) is greedy in
  the bits of that integer, its successor `hi` follows from lo's bits, and the threshold
  between them, the integer `lo + hi`, picks one: the comparison chain's answer exactly.
  """
  Z = expg_levels(T, K).Z
  w = v * 0.5
  n = jnp.where(w > 0, jnp.minimum(w, Z), 0).astype(jnp.int32)   # NaN and negatives: 0, like the chain
  top = _top_bit(n)
  a = jnp.maximum(top, 0)
  if K == T:                                           # every integer is a level
    lo, hi = n, jnp.minimum(n + 1, Z)
  elif K == 1:                                         # 0 and the powers of two
    lo = _pow2(top)
    hi = jnp.where(n == 0, 1, jnp.where(a + 1 <= T - 1, _pow2(a + 1), lo))
  else:                                                # K == 2: at most one odd and one even bit
    # the positions of a's parity; int32 like n (an int64 mask under x64 crashed XLA:CPU's eager `&`)
    same = jnp.where((a & 1) == 0, np.int32(0x55555555), np.int32(-0x55555556))
    other_top = _top_bit(n & ~same)
    conflict = _top_bit((n - _pow2(top)) & same)       # next bit of a's parity: take one below it
    b = jnp.maximum(other_top, conflict - 1)
    lo = jnp.where(n == 0, 0, _pow2(a) + _pow2(b))
    single = jnp.where(a == 0, 2, _pow2(a) + _pow2(1 - (a & 1)))
    pair = jnp.where(b + 2 < a, _pow2(a) + _pow2(b + 2), jnp.where(a + 1 <= T - 1, _pow2(a + 1), lo))
    hi = jnp.where(n == 0, 1, jnp.where(b >= 0, pair, single))
  return jnp.where(v >= (lo + hi).astype(v.dtype), hi, lo)


def code_scale(lam: jax.Array, T: int, K: int, dtype=jnp.float32) -> jax.Array:
  """`lam / Z`, the value of one unit of integer code (the least post-firing threshold).

  Computed as `lam * (1/Z)` with the reciprocal rounded once to `dtype`: XLA
  rewrites a division by a constant into that multiplication under jit, so only
  this form gives the same bits eagerly, under jit, on every backend.
  """
  return jnp.asarray(lam, dtype) * jnp.asarray(1.0 / expg_levels(T, K).Z, dtype)


@jax.custom_jvp
def grid_codes(q: jax.Array, unit: jax.Array) -> jax.Array:
  """The integer codes (as floats) of values `q = code * unit` that lie on a quantizer's grid.

  A layer fed quantizer outputs can then work on the exact codes and scale once, as spike
  mode does: the codes are exact in bf16 (|code| <= 2^8), `code * unit` mostly is not.
  Differentiable as `q / unit`, which it equals on the grid.
  """
  return jnp.round(q * (1 / unit).astype(q.dtype))


@grid_codes.defjvp
def _grid_codes_jvp(primals, tangents):
  q, unit = primals
  dq, dunit = tangents
  return grid_codes(q, unit), (dq - q * dunit / unit) / unit


def _code_parts(x, lam, T, K, symmetric, method):
  """`(sign, |code|)` of the neuron's integer code; the one-sided neuron's sign is 1."""
  if symmetric:
    return jnp.sign(x).astype(jnp.int32), expg_code(jnp.abs(x), lam, T, K, method)
  return 1, expg_code(x, lam, T, K, method)


def _sum_to_shape(g: jax.Array, shape) -> jax.Array:
  """Reduces a broadcast gradient back to the shape of the operand it came from."""
  extra = g.ndim - len(shape)
  g = jnp.sum(g, axis=tuple(range(extra))) if extra else g
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  return jnp.sum(g, axis=axes, keepdims=True) if axes else g


def _quantize_and_code(x, lam, T, K, symmetric, method):
  """`(Q(x), |code|)`: the quantizer's output and the unsigned integer code it was made from."""
  sign, code = _code_parts(x, lam, T, K, symmetric, method)
  return (sign * code).astype(x.dtype) * code_scale(lam, T, K, x.dtype), code


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def expg_quantize(x, lam, T: int, K: int, symmetric: bool = False, method: str = "search"):
  """`Q(x) = lam * nearest_L(clip(x / lam, 0, 1))` (symmetric: `sign(x) Q(|x|)`).

  Defined as `code * (lam / Z)` so that decoding the spikes reproduces it bitwise.
  Gradient: straight-through for `x` inside the clip range, zero outside; for
  `lam` the LSQ/QCFS form `q - x/lam` inside and `1` (times sign) above it.
  """
  return _quantize_and_code(x, lam, T, K, symmetric, method)[0]


def _quantize_fwd(x, lam, T, K, symmetric, method):
  # Only the input is kept: the backward pass searches the code again inside the fusion that
  # reads x, instead of the forward writing a code tensor out and the backward reading it back.
  return _quantize_and_code(x, lam, T, K, symmetric, method)[0], (x, lam)


def _backward_terms(x, lam, T, K, symmetric, method):
  """What the backward passes need at `x`, from one search for the code: `(inside, dQ/dlam, sign,
  above, Q(x))`: the straight-through mask, the LSQ/QCFS threshold derivative (`q - x/lam` inside
  the range, 1 times sign above it), the sign, where `|x|` exceeds `lam`, and the forward's output."""
  lam_b = jnp.asarray(lam, x.dtype)
  a = jnp.abs(x) if symmetric else x
  sign = jnp.sign(x) if symmetric else jnp.ones_like(x)
  inside = (a >= 0) & (a <= lam_b)
  code_sign, code = _code_parts(x, lam, T, K, symmetric, method)
  q = code.astype(x.dtype) * jnp.asarray(1.0 / expg_levels(T, K).Z, x.dtype)
  dlam = jnp.where(inside, q - a / lam_b, jnp.where(a > lam_b, 1.0, 0.0)) * sign
  out = (code_sign * code).astype(x.dtype) * code_scale(lam, T, K, x.dtype)   # as _quantize_and_code
  return inside, dlam, sign, a > lam_b, out


def _lam_cotangent(g, dlam, lam):
  """`sum(g * dlam)` over what `lam` was broadcast to, accumulated in at least float32."""
  acc = jnp.promote_types(jnp.result_type(lam), jnp.float32)
  return _sum_to_shape(g.astype(acc) * dlam.astype(acc), jnp.shape(lam)).reshape(jnp.shape(lam)).astype(jnp.result_type(lam))


def _quantize_bwd(T, K, symmetric, method, res, g):
  x, lam = res
  inside, dlam, _, _, _ = _backward_terms(x, lam, T, K, symmetric, method)
  return jnp.where(inside, g, jnp.zeros_like(g)), _lam_cotangent(g, dlam, lam)


expg_quantize.defvjp(_quantize_fwd, _quantize_bwd)


# ----------------------------------------------------------------------------
# Inference: the spike emitter
# ----------------------------------------------------------------------------
def weighted_step_sum(per_step: jax.Array) -> jax.Array:
  """`sum_t 2^(T-t) per_step[t]`, Horner's rule over the leading time axis: one doubling and
  one add a step, elementwise (a tensordot over T costs XLA a transpose copy on CPU)."""
  acc = per_step[0]
  for t in range(1, per_step.shape[0]):
    acc = acc * 2 + per_step[t]
  return acc


INTEGRATIONS = ("steps", "code")


@flax.struct.dataclass
class SpikeTrain:
  """What a spiking neuron layer hands to the next synaptic layer.

  spikes: `(T, *shape)`, values in {0, 1} ({-1, 0, 1} when symmetric), dtype of the input.
  scale: `lam / Z`; step t's post-firing threshold is `theta_t = scale * 2^(T-t)`.
  integration: how the next synaptic layer consumes the train (static). 'steps': it is applied
  to every binary step and the T outputs are integrated with `theta_t`, as a spiking chip
  computes. 'code': it is applied once to the decoded train `sum_t theta_t s_t`; the layer is
  linear, so this is the same sum in another order (float rounding aside), T times less work.
  Either way the spikes are emitted and counted; only the synaptic arithmetic is regrouped.
  """
  spikes: jax.Array
  scale: jax.Array
  integration: str = flax.struct.field(pytree_node=False, default="steps")

  @property
  def T(self) -> int:
    return self.spikes.shape[0]

  def code(self) -> jax.Array:
    """Integer code `sum_t 2^(T-t) s_t`, exact (shifts and adds)."""
    return weighted_step_sum(self.spikes)

  def decode(self) -> jax.Array:
    """`code * scale`: bitwise the quantizer's output for the emitting neuron's input."""
    return self.code() * self.scale.astype(self.spikes.dtype)


EMITTERS = ("bits", "scan")


def expg_spikes(x, lam, T: int, K: int, symmetric: bool = False, method: str = "search", emitter: str = "bits"):
  """Emits ExpG-IF spikes for the integrated input `x`.

  The neuron finds its level with one binary search over the pre-firing
  thresholds, then over the T steps fires whenever the remaining membrane (in
  code units) reaches the step's post-firing threshold `2^(T-t)`, with soft reset.
  `emitter='scan'` runs exactly that as a `lax.scan`; `'bits'` (default) reads the
  same spikes off the code's binary digits at once: a power-of-two threshold with
  soft reset fires on step t iff bit T-t of the membrane is set, so the two are
  identical, and the vectorised form avoids the scan's loop and stacking copies
  (2x faster spike-mode inference on CPU). Returns `(spikes, thetas)`; `spikes` has
  shape `(T, *x.shape)` and `thetas[t] = lam * 2^(T-t) / Z`.
  """
  sign, membrane = _code_parts(x, lam, T, K, symmetric, method)
  bases = jnp.asarray(step_bases(T), jnp.int32)
  if emitter == "bits":
    fired = (membrane[None] & bases.reshape((T,) + (1,) * x.ndim)) != 0
    spikes = (fired * sign).astype(x.dtype)
  elif emitter == "scan":
    def step(v, base):
      fire = v >= base
      return v - jnp.where(fire, base, 0), (fire * sign).astype(x.dtype)

    _, spikes = jax.lax.scan(step, membrane, bases)
  else:
    raise ValueError(f"Unknown spike emitter {emitter!r}: use one of {EMITTERS}.")
  thetas = code_scale(lam, T, K, x.dtype) * jnp.asarray(step_bases(T), x.dtype)
  return spikes, thetas


# ----------------------------------------------------------------------------
# Progressive activation (ClipReLU -> quantizer)
# ----------------------------------------------------------------------------
def progressive_activation(x, lam, alpha, T: int, K: int, symmetric: bool = False, method: str = "search"):
  """`(1 - alpha) * clip(x, 0, lam) + alpha * Q(x)`; symmetric clips to [-lam, lam].

  The end points are exact: alpha = 0 is ClipReLU and alpha = 1 the quantizer,
  bit for bit (a plain blend would turn -0.0 into 0.0 and round). A traced alpha (training's
  schedule) goes through one custom VJP that keeps only `x` for the backward pass.
  """
  if isinstance(alpha, (int, float)):
    if alpha >= 1:
      return expg_quantize(x, lam, T, K, symmetric, method)
    if alpha <= 0:
      return _clip(x, lam, symmetric)
  return _blend(x, lam, alpha, T, K, symmetric, method)


def _clip(x, lam, symmetric):
  lam_x = jnp.asarray(lam, x.dtype)
  return jnp.clip(x, -lam_x if symmetric else 0, lam_x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _blend(x, lam, alpha, T, K, symmetric, method):
  clipped = _clip(x, lam, symmetric)
  q = _quantize_and_code(x, lam, T, K, symmetric, method)[0]
  alpha = jnp.asarray(alpha, x.dtype)
  blend = (1 - alpha) * clipped + alpha * q
  return jnp.where(alpha >= 1, q, jnp.where(alpha <= 0, clipped, blend))


def _blend_fwd(x, lam, alpha, T, K, symmetric, method):
  return _blend(x, lam, alpha, T, K, symmetric, method), (x, lam, alpha)


def _blend_bwd(T, K, symmetric, method, res, g):
  # ClipReLU and the straight-through quantizer pass the gradient on the same range, so the
  # blend's x-gradient is that mask whatever alpha; lam's is the blend of the two derivatives.
  x, lam, alpha = res
  inside, dlam_q, sign, above, q = _backward_terms(x, lam, T, K, symmetric, method)
  a = jnp.asarray(alpha, x.dtype)
  w = jnp.clip(a, 0, 1)
  dlam = w * dlam_q + (1 - w) * jnp.where(above, sign, 0)
  dalpha = jnp.where((a > 0) & (a < 1), q - _clip(x, lam, symmetric), jnp.zeros_like(q))
  return jnp.where(inside, g, jnp.zeros_like(g)), _lam_cotangent(g, dlam, lam), _lam_cotangent(g, dalpha, alpha)


_blend.defvjp(_blend_fwd, _blend_bwd)


ALPHA_KINDS = ("linear", "cosine", "poly", "constant")


def alpha_schedule(total_steps: int, kind: str = "linear", ramp_end: float = 0.8,
                   power: float = 1.0) -> optax.Schedule:
  """The progressive activation's alpha as an optax schedule of the optimizer's step count.

  alpha rises from 0 (ClipReLU) to 1 (the quantizer) over the first `ramp_end * total_steps`
  steps, which need not be a whole number, and holds at 1 after, so the last stretch of training
  already sees the exact quantizer. With `r = step / (ramp_end * total_steps)`: 'linear' is r
  (e/E when ramp_end = 1), 'cosine' the half-cosine (1 - cos(pi r)) / 2, 'poly' r ** power,
  'constant' 1 throughout (pure quantizer training).
  """
  if kind not in ALPHA_KINDS:
    raise ValueError(f"Unknown alpha schedule {kind!r}: use 'linear', 'cosine', 'poly' or 'constant'.")
  if not 0 < ramp_end <= 1:
    raise ValueError(f"alpha ramp_end={ramp_end} is outside (0, 1]: set it to the fraction of total_steps "
                     f"at which alpha reaches 1.")
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1 for the alpha schedule.")
  if kind == "constant":
    return optax.constant_schedule(1.0)
  ramp_steps = ramp_end * total_steps
  linear = optax.linear_schedule(0.0, 1.0, ramp_steps)
  if kind == "linear":
    ramp = linear
  elif kind == "cosine":
    # optax's cosine schedules fall from their peak (cosine_decay_schedule) or rise from
    # peak / div_factor, never from 0 (cosine_onecycle_schedule): the rise is one minus the fall.
    fall = optax.cosine_decay_schedule(1.0, ramp_steps)
    ramp = lambda count: 1.0 - fall(count)
  else:
    # optax's polynomial_schedule(0, 1, power) is 1 - (1 - r) ** power, the mirror image of this
    # ramp (fast where it is slow): the ramp is the linear one raised to the power.
    ramp = lambda count: linear(count) ** power
  # 1 exactly from the first whole step at or past the ramp's end (a ramp may end between two
  # steps), not by the ramps' rounding: only alpha >= 1 is the quantizer bit for bit.
  return optax.join_schedules([ramp, optax.constant_schedule(1.0)], [math.ceil(ramp_steps)])


# ----------------------------------------------------------------------------
# The NNX module
# ----------------------------------------------------------------------------
@jax.custom_vjp
def scale_grad(x, scale):
  """Identity in the forward pass; multiplies the gradient by `scale` (a constant)."""
  return x


scale_grad.defvjp(lambda x, scale: (x, scale), lambda scale, g: (g * scale, None))


@dataclasses.dataclass(frozen=True)
class Neuron:
  """The options of a network's ExpG-IF neurons, each checked here once (`ExpGIF` builds one too)."""
  T: int = 4
  K: int = 2
  lam_init: float = 1.0
  # Level search, one result: 'search' (binary) | 'compare' (a chain over the |L|-1 thresholds; fastest
  # on CPU for small T) | 'arith' (bit arithmetic, cost flat in T; for large T, K in {1, 2, T}).
  quantizer: str = "compare"
  emitter: str = "bits"                       # spike emission: 'bits' (vectorised) | 'scan' (IF loop; same spikes)
  # Spike-mode synapses: 'steps' (each layer on every binary step, then integrated, as a chip does) |
  # 'code' (each layer once on the decoded train: the same linear sum regrouped, ~T x less work).
  spike_integration: str = "steps"

  def __post_init__(self):
    check_tk(self.T, self.K)
    if not self.lam_init > 0:
      raise ValueError(f"ExpG-IF lam_init={self.lam_init} must be > 0.")
    for name, choices in (("quantizer", METHODS), ("emitter", EMITTERS), ("spike_integration", INTEGRATIONS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name}={getattr(self, name)!r}: use one of {choices}.")


class ExpGIF(nnx.Module):
  """An ExpG-IF neuron layer with a learnable threshold `lam` (one per layer).

  Called as `neuron(x, ctx)` with the pass's `Forward` context. Quantize mode: the progressive
  activation (training; alpha=1 is the exact quantizer). Spike mode: returns a `SpikeTrain` of
  T steps whose decoding is bitwise the quantizer's output.
  """

  def __init__(self, T: int = 4, K: int = 2, symmetric: bool = False, lam_init: float = 1.0,
               method: str = "search", emitter: str = "bits", integration: str = "steps", *,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; the argument keeps the NNX constructor convention.
    Neuron(T, K, lam_init, method, emitter, integration)   # checks the options
    self.T, self.K, self.symmetric, self.method, self.emitter = T, K, symmetric, method, emitter
    self.integration = integration
    self.lam = nnx.Param(jnp.asarray(lam_init, jnp.float32))

  def threshold(self) -> jax.Array:
    # |lam| keeps the neuron well-defined if an optimiser step ever pushes it negative.
    return jnp.abs(self.lam[...]) + 1e-6

  def training_threshold(self, features: int) -> jax.Array:
    """The threshold quantize mode uses for an input of `features` values per image: LSQ's
    step-size gradient scale 1/sqrt(features * levels) on it, since lam's gradient sums over
    every feature of the layer and would otherwise dwarf the weights' gradients."""
    lam = self.threshold()
    return scale_grad(lam, jnp.asarray(1.0 / np.sqrt(features * expg_levels(self.T, self.K).Z), lam.dtype))

  def code_unit(self, dtype=jnp.float32) -> jax.Array:
    """`lam / Z` in `dtype`, as both modes compute it: the value of one unit of the neuron's code."""
    return code_scale(self.threshold().astype(dtype), self.T, self.K, dtype)

  def __call__(self, x, ctx: Forward):
    # float32 whatever the activations' dtype, in both modes: the thresholds compare against it in
    # float32, and its gradient sums over the whole layer.
    if ctx.mode == "quantize":
      lam = self.training_threshold(max(x.size // max(x.shape[0], 1), 1))
      return progressive_activation(x, lam, ctx.alpha, self.T, self.K, self.symmetric, self.method)
    if ctx.mode == "stbp":
      raise ValueError("mode='stbp' needs LIF neurons: build the network with paradigm='stbp'.")
    spikes, _ = expg_spikes(x, self.threshold(), self.T, self.K, self.symmetric, self.method, self.emitter)
    if ctx.collect:
      self.sow(SpikeStats, "spike_count", jnp.sum(jnp.abs(spikes), dtype=jnp.float32))
      self.sow(SpikeStats, "neurons", jnp.asarray(x.size, jnp.float32))
    return SpikeTrain(spikes, self.code_unit(x.dtype), self.integration)
