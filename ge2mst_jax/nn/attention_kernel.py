"""GW-SSA's training-time attention core as one Pallas TPU kernel, forward and backward.

`attention_core(q, k, v, lam, alpha, ...)` computes, for one part (global or local channels) of
a GW-SSA layer in quantize mode with training's progressive activation, what
`SpikingAttention.attend` computes through XLA:

    O = from_groups(einsum(blend(einsum(Q, K) * 2^-m), V))

with `blend` the attention neuron's `(1 - alpha) clip + alpha Q` (`neurons._blend`). XLA writes
every score map `(..., G, heads, N, N)` out between its fusions, in (8, 128) tiles that pad
49 x 49 to 56 x 128 (TPU compiler on v5e, docs/benchmarks.md, the TPU rows). Here a score map never
leaves the chip: each grid step reads one group's q, k, v for 128 images, keeps the scores in
VMEM, and writes the group's output; the backward pass recomputes the scores the same way. What
reaches HBM is q, k, v and O (forward), q, k, v, dO, dq, dk, dv (backward), and two lane-wide
partial sums for the neuron's `lam` and `alpha` gradients.

Layout: the images are the lanes. The tensors are viewed as `(H, W, C, B)`, the batch-minor
layout the TPU compiler already picks for these activations, so the view is a bitcast, and a
group is a block of the leading dims: local window (i, j) is `[i*p:(i+1)*p, j*p:(j+1)*p]`, global
group (i, j) is `[i::s, j::s]`, both plain block index maps after splitting H and W. A product
over a head's channels is then a multiply and a sublane sum of `(d, 128)` tiles, one token row at
a time, with no padding. Those products run on the vector unit, not the MXU: a 49-token group's
products are too small for it either way, and the kernel is bound by what it reads, not by them.

`interpret=True` runs the same kernel through Pallas's interpreter on any backend: the tests check
it against the XLA path on CPU. The kernel is used only where `Numerics.attention_kernel` says
so (`'auto'`: on TPU); evaluation (static alpha, exact grids) and spike mode always take the XLA
path, whose bit-for-bit equalities the tests hold.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from ge2mst_jax.spiking.neurons import code_of_doubled_units, expg_levels

LANES = 128   # images per grid step: the lane width of a TPU vector register
KINDS = ("global", "local", None)   # None: plain SSA, the whole map one group
# Scalars the kernels read from SMEM (see `_neuron_scalars`).
_TWO_Z_OVER_LAM, _LAM, _UNIT, _C_CLIP, _C_Q, _INV_Z, _W, _ONE_MINUS_W, _MID = range(9)


# ----------------------------------------------------------------------------
# The attention neuron on a block: neurons._blend and its VJP, elementwise
# ----------------------------------------------------------------------------
def _neuron_scalars(lam, alpha, T: int, K: int, dtype) -> jax.Array:
  """The neuron's scalars, each rounded where `neurons._blend` rounds it and held as float32
  (exactly: each is a value of `dtype`, or the float32 `2Z / lam` of `doubled_code_units`).

  `_blend`'s choices on alpha (the clip at alpha <= 0, the quantizer at alpha >= 1) are made
  here, as the coefficients of `c_clip * clip + c_q * Q`: Mosaic cannot select vectors with a
  mask made from two scalars, and `0 * clip + 1 * Q` is `Q` exactly."""
  Z = expg_levels(T, K).Z
  lam = jnp.asarray(lam, jnp.float32)
  a = jnp.asarray(alpha, dtype)
  zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
  c_clip = jnp.where(a >= 1, zero, jnp.where(a <= 0, one, 1 - a))
  c_q = jnp.where(a >= 1, one, jnp.where(a <= 0, zero, a))
  w = jnp.clip(a, 0, 1)
  inv_z = jnp.asarray(1.0 / Z, dtype)
  return jnp.stack([jnp.asarray(2 * Z, jnp.float32) / lam] + [t.astype(jnp.float32) for t in (
      lam.astype(dtype), lam.astype(dtype) * inv_z, c_clip, c_q, inv_z, w, 1 - w,
      ((a > 0) & (a < 1)).astype(dtype))])


def _blend_terms(x, sc, T: int, K: int, rd):
  """`(blend(x), code, Q(x), clip(x))` of scores `x` (`_blend`'s forward). Float32 arrays holding
  values of the activations' dtype; `rd` rounds to that dtype after each operation that `_blend`
  computes in it, as XLA computes a bf16 operation (in float32, rounded once)."""
  clipped = jnp.minimum(jnp.maximum(x, 0.0), sc[_LAM])
  code_x = rd(code_of_doubled_units(x * sc[_TWO_Z_OVER_LAM], T, K, "compare").astype(jnp.float32))
  q = rd(code_x * sc[_UNIT])
  return rd(rd(sc[_C_CLIP] * clipped) + rd(sc[_C_Q] * q)), code_x, q, clipped


def _blend_backward(x, g, sc, T: int, K: int, rd):
  """`(blend(x), dx, dlam, dalpha)` for cotangent `g` (`_blend_bwd`), as `_blend_terms`; the
  threshold's and alpha's terms summed over the leading axis."""
  out, code_x, q, clipped = _blend_terms(x, sc, T, K, rd)
  inside, above = (x >= 0) & (x <= sc[_LAM]), (x > sc[_LAM]).astype(jnp.float32)
  dlam_q = jnp.where(inside, rd(rd(code_x * sc[_INV_Z]) - rd(x / sc[_LAM])), above)
  dlam = rd(rd(sc[_W] * dlam_q) + rd(sc[_ONE_MINUS_W] * above))
  dalpha = rd(sc[_MID] * rd(q - clipped))
  return out, jnp.where(inside, g, 0.0), jnp.sum(g * dlam, axis=0), jnp.sum(g * dalpha, axis=0)


# ----------------------------------------------------------------------------
# Blocks: which tokens a grid step reads
# ----------------------------------------------------------------------------
class _Plan:
  """How one part's `(B, H, W, C)` tensors are laid out and cut for the kernels."""

  def __init__(self, shape, dtype, kind, stride, heads):
    B, H, W, C = shape
    if kind not in KINDS:
      raise ValueError(f"Unknown attention grouping {kind!r}: use one of {KINDS}.")
    self.kind, self.s = kind, (stride if kind is not None else 1)
    if H % self.s or W % self.s or C % heads:
      raise ValueError(f"attention_core: a {H}x{W}x{C} map does not split into stride {self.s} groups "
                       f"and {heads} heads.")
    self.B, self.H, self.W, self.C, self.dtype = B, H, W, C, jnp.dtype(dtype)
    self.ph, self.pw = H // self.s, W // self.s
    self.N, self.d, self.heads = self.ph * self.pw, C // heads, heads
    # A block's channel count is a sublane dimension: one head where a head fills whole packed
    # rows (16 for 16-bit types), else all heads of the part together.
    self.hb = 1 if self.d % 16 == 0 else heads
    self.cb = self.hb * self.d
    self.lanes = min(B, LANES)   # a smaller batch is one full-width block; a larger one is padded to LANES
    self.Bp = -(-B // self.lanes) * self.lanes
    self.grid = (self.s, self.s, heads // self.hb, self.Bp // self.lanes)

  @property
  def split_shape(self):
    """`(H, W, C, B)` with H and W split so that a group is a block of the leading dims."""
    s, ph, pw, C = self.s, self.ph, self.pw, self.C
    return (ph, s, pw, s, C, self.Bp) if self.kind == "global" else (s, ph, s, pw, C, self.Bp)

  def to_blocks(self, x):
    x = jnp.transpose(x, (1, 2, 3, 0))
    if self.Bp != self.B:
      x = jnp.pad(x, ((0, 0),) * 3 + ((0, self.Bp - self.B),))
    return x.reshape(self.split_shape)

  def from_blocks(self, x):
    x = x.reshape(self.H, self.W, x.shape[-2], self.Bp)[..., :self.B]
    return jnp.transpose(x, (3, 0, 1, 2))

  def spec(self):
    ph, pw, cb, lanes = self.ph, self.pw, self.cb, self.lanes
    if self.kind == "global":
      return pl.BlockSpec((ph, 1, pw, 1, cb, lanes), lambda i, j, c, b: (0, i, 0, j, c, b))
    return pl.BlockSpec((1, ph, 1, pw, cb, lanes), lambda i, j, c, b: (i, 0, j, 0, c, b))

  def partial_spec(self):
    return pl.BlockSpec((1, 1, 1, 1, self.lanes), lambda i, j, c, b: (i, j, c, 0, b))

  def partial_shape(self):
    return jax.ShapeDtypeStruct((self.s, self.s, self.heads // self.hb, 1, self.Bp), jnp.float32)

  def row(self, ref, n, sl):
    """Token `n` of the block (its (p, q) position in the group), channels `sl`: `(d, lanes)`."""
    p, q = jax.lax.div(n, self.pw), jax.lax.rem(n, self.pw)   # n >= 0; `//` lowers through sign
    return ref[p, 0, q, 0, sl, :] if self.kind == "global" else ref[0, p, 0, q, sl, :]

  def set_row(self, ref, n, sl, value):
    p, q = jax.lax.div(n, self.pw), jax.lax.rem(n, self.pw)   # n >= 0; `//` lowers through sign
    if self.kind == "global":
      ref[p, 0, q, 0, sl, :] = value.astype(ref.dtype)
    else:
      ref[0, p, 0, q, sl, :] = value.astype(ref.dtype)

  def tokens(self, ref):
    """The whole block as `(N, cb, lanes)` float32."""
    return ref[...].reshape(self.N, self.cb, self.lanes).astype(jnp.float32)

  def array_bytes(self):
    return self.Bp * self.H * self.W * self.C * self.dtype.itemsize

  def products(self):
    """Multiply-adds of one product (QK^T or AV) over the whole batch."""
    return self.Bp * self.s * self.s * self.heads * self.N * self.N * self.d


def _pltpu():
  """Pallas's TPU module, imported where a kernel is built: importing it costs ~0.2 s, which every
  process that only builds the model (CPU training, evaluation, the tests' subprocesses) would pay."""
  from jax.experimental.pallas import tpu  # pylint: disable=g-import-not-at-top
  return tpu


def _smem_spec():
  return pl.BlockSpec(memory_space=_pltpu().SMEM)


def _scratch(shape):
  return _pltpu().VMEM(shape, jnp.float32)


def _params(vmem_bytes):
  # Every grid step is independent (its own group, heads and images): megacore chips split them.
  return _pltpu().CompilerParams(dimension_semantics=("parallel",) * 4,
                              vmem_limit_bytes=int(min(max(32 << 20, 2 * vmem_bytes), 64 << 20)))


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------
def _round_to(x, dtype):
  """`x` (float32) rounded to `dtype` and held as float32 again."""
  return x if dtype == jnp.float32 else x.astype(dtype).astype(jnp.float32)


def _forward_kernel(sc_ref, q_ref, k_ref, v_ref, o_ref, *, plan: _Plan, scale: float, T: int, K: int):
  rd = functools.partial(_round_to, dtype=plan.dtype)
  sc = [sc_ref[i] for i in range(9)]
  kf, vf = plan.tokens(k_ref), plan.tokens(v_ref)
  for h in range(plan.hb):
    sl = slice(h * plan.d, (h + 1) * plan.d)
    kh, vh = kf[:, sl], vf[:, sl]

    def row(n, carry, sl=sl, kh=kh, vh=vh):
      qn = plan.row(q_ref, n, sl).astype(jnp.float32)                     # (d, lanes)
      x = rd(rd(jnp.sum(qn[None] * kh, axis=1)) * scale)                   # scores of token n
      a = _blend_terms(x, sc, T, K, rd)[0]
      plan.set_row(o_ref, n, sl, jnp.sum(a[:, None] * vh, axis=0))
      return carry

    jax.lax.fori_loop(0, plan.N, row, 0)


def _backward_kernel(sc_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, dlam_ref, dalpha_ref,
                     dk_acc, dv_acc, rows, *, plan: _Plan, scale: float, T: int, K: int):
  rd = functools.partial(_round_to, dtype=plan.dtype)
  sc = [sc_ref[i] for i in range(9)]
  kf, vf = plan.tokens(k_ref), plan.tokens(v_ref)
  dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
  dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
  sums = jnp.zeros((2, plan.lanes), jnp.float32)
  for h in range(plan.hb):
    sl = slice(h * plan.d, (h + 1) * plan.d)
    kh, vh = kf[:, sl], vf[:, sl]

    def row(n, sums, sl=sl, kh=kh, vh=vh):
      qn = plan.row(q_ref, n, sl).astype(jnp.float32)
      don = plan.row(do_ref, n, sl).astype(jnp.float32)
      # Through VMEM: a sublane sum's result has a layout Mosaic cannot select on.
      rows[0] = jnp.sum(qn[None] * kh, axis=1)
      rows[1] = jnp.sum(don[None] * vh, axis=1)                             # dO V^T, row n
      x = rd(rd(rows[0]) * scale)
      a, dx, dlam, dalpha = _blend_backward(x, rd(rows[1]), sc, T, K, rd)
      ds = rd(dx * scale)                                                   # (N, lanes)
      plan.set_row(dq_ref, n, sl, jnp.sum(ds[:, None] * kh, axis=0))
      dk_acc[:, sl, :] += ds[:, None] * qn[None]
      dv_acc[:, sl, :] += a[:, None] * don[None]
      return sums + jnp.stack([dlam, dalpha])

    sums = jax.lax.fori_loop(0, plan.N, row, sums)
  dk_ref[...] = dk_acc[...].reshape(dk_ref.shape).astype(dk_ref.dtype)
  dv_ref[...] = dv_acc[...].reshape(dv_ref.shape).astype(dv_ref.dtype)
  dlam_ref[...] = sums[0].reshape(dlam_ref.shape)
  dalpha_ref[...] = sums[1].reshape(dalpha_ref.shape)


# ----------------------------------------------------------------------------
# The differentiable core
# ----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def attention_core(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K, interpret=False):
  """One GW-SSA part in training's quantize mode, `(B, H, W, C)` each (the part's channels):
  `from_groups(einsum(blend(einsum(q, k) 2^-m), v))` with the attention neuron's threshold
  `lam` (float32 scalar, as `ExpGIF.training_threshold` gives it) and blend `alpha`."""
  return _forward(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K, interpret)


def _forward(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K, interpret):
  plan = _Plan(q.shape, q.dtype, kind, stride, heads)
  kernel = functools.partial(_forward_kernel, plan=plan, scale=2.0 ** -scale_log2, T=T, K=K)
  out = pl.pallas_call(
      kernel, grid=plan.grid, in_specs=[_smem_spec()] + [plan.spec()] * 3, out_specs=plan.spec(),
      out_shape=jax.ShapeDtypeStruct(plan.split_shape, q.dtype),
      compiler_params=None if interpret else _params(3 * plan.N * plan.cb * plan.lanes * 4),
      cost_estimate=pl.CostEstimate(flops=4 * plan.products(), transcendentals=0,
                                    bytes_accessed=4 * plan.array_bytes()),
      interpret=interpret,
  )(_neuron_scalars(lam, alpha, T, K, q.dtype), plan.to_blocks(q), plan.to_blocks(k), plan.to_blocks(v))
  return plan.from_blocks(out)


def _core_fwd(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K, interpret):
  return _forward(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K, interpret), (q, k, v, lam, alpha)


def _core_bwd(kind, stride, heads, scale_log2, T, K, interpret, res, g):
  q, k, v, lam, alpha = res
  plan = _Plan(q.shape, q.dtype, kind, stride, heads)
  kernel = functools.partial(_backward_kernel, plan=plan, scale=2.0 ** -scale_log2, T=T, K=K)
  blocks = jax.ShapeDtypeStruct(plan.split_shape, q.dtype)
  acc = (plan.N, plan.cb, plan.lanes)
  dq, dk, dv, dlam, dalpha = pl.pallas_call(
      kernel, grid=plan.grid, in_specs=[_smem_spec()] + [plan.spec()] * 4,
      out_specs=[plan.spec()] * 3 + [plan.partial_spec()] * 2,
      out_shape=[blocks] * 3 + [plan.partial_shape()] * 2,
      scratch_shapes=[_scratch(acc), _scratch(acc), _scratch((2, plan.N, plan.lanes))],
      compiler_params=None if interpret else _params(7 * math.prod(acc) * 4),
      cost_estimate=pl.CostEstimate(flops=10 * plan.products(), transcendentals=0, bytes_accessed=(
          7 * plan.array_bytes() + 2 * 4 * math.prod(plan.partial_shape().shape))),
      interpret=interpret,
  )(_neuron_scalars(lam, alpha, T, K, q.dtype), *(plan.to_blocks(t) for t in (q, k, v, g)))
  d = [plan.from_blocks(t) for t in (dq, dk, dv)]
  return (*d, jnp.sum(dlam).astype(jnp.result_type(lam)).reshape(jnp.shape(lam)),
          jnp.sum(dalpha).astype(jnp.result_type(alpha)).reshape(jnp.shape(alpha)))


attention_core.defvjp(_core_fwd, _core_bwd)



def sharded_attention_core(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K, interpret=False):
  """`attention_core` on each device's images when a mesh is in context (`jax.set_mesh` or
  `jax.sharding.use_abstract_mesh`): the batch split over every axis of the mesh, as the project's
  (data, fsdp) mesh splits it. XLA's partitioner cannot split a kernel's custom call and would
  gather the whole batch onto every device; under `shard_map` each device runs the kernel on its
  own images, and the two scalar gradients are summed over the devices."""
  mesh = jax.sharding.get_abstract_mesh()
  static = (kind, stride, heads, scale_log2, T, K, interpret)
  if mesh.empty or mesh.size == 1:
    return attention_core(q, k, v, lam, alpha, *static)
  batch, rep = P(mesh.axis_names), P()
  core = lambda q, k, v, lam, alpha: attention_core(q, k, v, lam, alpha, *static)
  return jax.shard_map(core, mesh=mesh, in_specs=(batch, batch, batch, rep, rep), out_specs=batch,
                       check_vma=False)(q, k, v, lam, alpha)
