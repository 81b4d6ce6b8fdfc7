"""Spiking self-attention (SSA) and group-wise SSA (GW-SSA): docs/math.md#attention.

SSA has no softmax and no real-valued products: `A = IF(Q K^T 2^-m)`, `O = IF±(A V)`
with Q, K, V spike-coded by symmetric ExpG-IF neurons. In spike mode each product
takes two `SpikeTrain`s and is computed from their spikes: every step of one against
every step of the other (binary by binary: accumulates only), integrated with shifts
and adds, then scaled once by the two presynaptic `lam / Z`. Under
`spike_integration='code'` the two decoded integer codes are multiplied instead: the
same integer sum regrouped (T^2 times less work), documented as such.

GW-SSA splits channels into a global part (strided groups `x[i::s, j::s]`) and a
local part (`s x s` windows); both groupings are reshapes + one transpose, and the
attention of all groups and heads is one batched einsum.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ge2mst_jax.nn.attention_kernel import sharded_attention_core
from ge2mst_jax.nn.blocks import Compute, SynapticConv, make_neuron, sow_inputs
from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.neurons import SpikeTrain, grid_codes, weighted_step_sum
from ge2mst_jax.spiking.spike_stats import SpikeStats

GROUPINGS = ("global", "local")


# ----------------------------------------------------------------------------
# Token grouping (pure)
# ----------------------------------------------------------------------------
def check_divisible(H: int, W: int, s: int) -> None:
  if H % s or W % s:
    raise ValueError(f"GW-SSA stride s={s} does not divide the {H}x{W} token map: choose a stride that "
                     f"divides both (or change the input size).")


def to_groups(x: jax.Array, s: int, kind: str) -> jax.Array:
  """`(..., H, W, C)` -> `(..., s*s, (H/s)*(W/s), C)`.

  global: group (i, j) holds tokens `x[i::s, j::s]` (row h = p*s + i), a dilated view of
  the whole map; local: group (i, j) is window `x[i*H/s:(i+1)*H/s, j*W/s:(j+1)*W/s]`.
  """
  *lead, H, W, C = x.shape
  check_divisible(H, W, s)
  n = len(lead)
  if kind == "global":
    x = x.reshape(*lead, H // s, s, W // s, s, C)      # (..., p, i, q, j, C)
    perm = (n + 1, n + 3, n, n + 2)
  elif kind == "local":
    x = x.reshape(*lead, s, H // s, s, W // s, C)      # (..., i, p, j, q, C)
    perm = (n, n + 2, n + 1, n + 3)
  else:
    raise ValueError(f"Unknown grouping {kind!r}: use one of {GROUPINGS}.")
  x = jnp.transpose(x, (*range(n), *perm, n + 4))      # (..., i, j, p, q, C)
  return x.reshape(*lead, s * s, (H // s) * (W // s), C)


def from_groups(x: jax.Array, s: int, kind: str, H: int, W: int) -> jax.Array:
  """Inverse of `to_groups`."""
  *lead, _, _, C = x.shape
  n = len(lead)
  x = x.reshape(*lead, s, s, H // s, W // s, C)        # (..., i, j, p, q, C)
  if kind == "global":
    x = jnp.transpose(x, (*range(n), n + 2, n, n + 3, n + 1, n + 4))   # (..., p, i, q, j, C)
  elif kind == "local":
    x = jnp.transpose(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))   # (..., i, p, j, q, C)
  else:
    raise ValueError(f"Unknown grouping {kind!r}: use one of {GROUPINGS}.")
  return x.reshape(*lead, H, W, C)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  if x.shape[-1] % heads:
    raise ValueError(f"Attention channels {x.shape[-1]} not divisible by heads={heads}.")
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def grouping(kind: str | None, stride: int | None, heads: int, H: int, W: int):
  """`(group, ungroup)` of one attention part: `(..., H, W, c)` tokens to `(..., G, N, heads, d)`
  and back; `kind=None` is plain SSA, the whole map one group."""
  if kind is None:
    return (lambda t: split_heads(t.reshape(*t.shape[:-3], 1, H * W, t.shape[-1]), heads),
            lambda t: t.reshape(*t.shape[:-4], H, W, -1))
  return (lambda t: split_heads(to_groups(t, stride, kind), heads),
          lambda t: from_groups(t.reshape(*t.shape[:-2], -1), stride, kind, H, W))


# ----------------------------------------------------------------------------
# Products of spike-coded operands
# ----------------------------------------------------------------------------
def exact_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum` accumulated and returned in at least float32: a product of integer codes (or
  spikes) is then an exact integer sum whatever the operands' dtype (bf16 holds integers only
  up to 256)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def spike_einsum(spec: str, a: SpikeTrain, b: SpikeTrain, *, sow_to: nnx.Module | None = None,
                 name: str = "matmul") -> jax.Array:
  """`einsum(spec, decode(a), decode(b))` computed from the spikes alone.

  'steps' integration (default): `sum_t sum_u 2^(T-t) 2^(T-u) einsum(a_t, b_u)`, each term a
  product of two binary (ternary) steps, i.e. accumulates of spike pairs; Horner's rule over
  `u` keeps T partial products alive, not T^2. 'code': `einsum(code(a), code(b))`, the same
  integer sum regrouped. Either is exact in float32 while a sum stays below 2^24 (T=4: 225
  per pair, so over 70 000 terms), so the two give the same bits. SOPs: each pair of non-zero
  spikes meeting in the product is one accumulate, i.e. `einsum(spec, n_a, n_b)` summed,
  where `n` counts the spikes of an element over the T steps.
  """
  if a.integration == "code" or b.integration == "code":
    codes = exact_einsum(spec, a.code(), b.code())
  else:
    codes = None
    for b_u in b.spikes:   # every step of `a` against step u of `b`, integrated over a's steps
      term = weighted_step_sum(jax.vmap(lambda a_t, b_u=b_u: exact_einsum(spec, a_t, b_u))(a.spikes))
      codes = term if codes is None else codes * 2 + term
  out = (codes * (a.scale * b.scale).astype(codes.dtype)).astype(a.spikes.dtype)
  if sow_to is not None:
    count = lambda t: jnp.sum(jnp.abs(t.spikes), axis=0, dtype=jnp.float32)
    sow_to.sow(SpikeStats, f"{name}_sops", jnp.sum(jnp.einsum(spec, count(a), count(b))))
    sow_inputs(sow_to, a.spikes, f"{name}_a_")
    sow_inputs(sow_to, b.spikes, f"{name}_b_")
  return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def grid_einsum(spec: str, a, b, scale_a, scale_b):
  """`einsum(spec, a, b)` for operands on their quantizer grids (`a = code_a * scale_a`).

  Computed as the spiking product is, `einsum(code_a, code_b) * (scale_a * scale_b)`
  with the integer codes recovered by rounding, so quantize mode and spike mode give
  the same bits. That matters here: at a fresh init both operands and the next
  neuron's thresholds sit on commensurate grids and exact ties are common, so any
  other rounding would send tied scores to different levels in the two modes.
  The derivative is the bilinear one of the plain einsum.
  """
  codes = exact_einsum(spec, grid_codes(a, scale_a), grid_codes(b, scale_b))
  return (codes * (scale_a * scale_b).astype(codes.dtype)).astype(a.dtype)


@grid_einsum.defjvp
def _grid_einsum_jvp(spec, primals, tangents):
  a, b, sa, sb = primals
  da, db, _, _ = tangents
  return grid_einsum(spec, a, b, sa, sb), (exact_einsum(spec, da, b) + exact_einsum(spec, a, db)).astype(a.dtype)


def _product(spec, a, b, ctx: Forward, owner, name, scales=None):
  with jax.named_scope(f"{owner.scope}.{name}"):   # the name energy reports give the product
    if ctx.mode == "spike":
      out = spike_einsum(spec, a, b, sow_to=owner if ctx.collect else None, name=name)
      contracted = a.spikes.shape[-1]
    else:
      out = exact_einsum(spec, a, b).astype(a.dtype) if scales is None else grid_einsum(spec, a, b, *scales)
      contracted = a.shape[-1]
      if ctx.mode == "stbp" and ctx.collect:  # binary spikes of one step meet: one accumulate per pair
        owner.sow(SpikeStats, f"{name}_sops", jnp.sum(jnp.einsum(spec, jnp.abs(a), jnp.abs(b))))
  if ctx.collect:  # dense MACs per image (and per step in stbp): every output sums `contracted` products
    per_image = out.shape[0] * (out.shape[1] if ctx.mode == "stbp" else 1)
    owner.sow(SpikeStats, f"{name}_macs", jnp.asarray(out.size // per_image * contracted, jnp.float32))
    owner.sow(SpikeStats, f"{name}_outputs", jnp.asarray(out.size, jnp.float32))   # batch total; qk: the score map
  return out


def _tokens(x, fn):
  """Applies an array function to a real tensor or to each spike step of a SpikeTrain."""
  return x.replace(spikes=fn(x.spikes)) if isinstance(x, SpikeTrain) else fn(x)


# ----------------------------------------------------------------------------
# The attention layer
# ----------------------------------------------------------------------------
class SpikingAttention(nnx.Module):
  """SSA (stride=None) or GW-SSA (stride s) on `(B, H, W, C)` tokens; returns `Proj(O)`.

  It takes the spikes of the block's input neuron (which the block owns and shares with its conv
  branch): `attn(s, ctx, unit=ctx.unit(neuron, x.dtype))`. GW-SSA: channels `[:C*global_frac]`
  attend within strided global groups, the rest within `s x s` local windows; each part uses
  `heads` heads.
  """

  def __init__(self, dim: int, heads: int, stride: int | None = None, global_frac: float = 0.5,
               scale_log2: int | None = None, *, neuron: dict, compute: Compute = Compute(),
               rngs: nnx.Rngs):
    self.dim, self.heads, self.stride = dim, heads, stride
    self.kernel = compute.attention
    self.scope = "attention"   # its path once in a network (`blocks.name_layers`)
    if stride is None:
      self.parts = ((None, dim),)
    else:
      cg = int(round(dim * global_frac))
      self.parts = tuple((k, c) for k, c in (("global", cg), ("local", dim - cg)) if c > 0)
    for kind, c in self.parts:
      if c % heads:
        raise ValueError(f"Attention part {kind or 'ssa'} has {c} channels, not divisible by heads={heads}.")
    head_dim = min(c for _, c in self.parts) // heads
    self.scale_log2 = int(round(0.5 * math.log2(head_dim))) if scale_log2 is None else int(scale_log2)
    sym = dict(neuron, symmetric=True)
    self.q = SynapticConv(dim, dim, 1, compute=compute, rngs=rngs)
    self.k = SynapticConv(dim, dim, 1, compute=compute, rngs=rngs)
    self.v = SynapticConv(dim, dim, 1, compute=compute, rngs=rngs)
    self.q_if, self.k_if, self.v_if = make_neuron(**sym), make_neuron(**sym), make_neuron(**sym)
    self.attn_if = make_neuron(**dict(neuron, symmetric=False))
    self.out_if = make_neuron(**sym)
    self.proj = SynapticConv(dim, dim, 1, compute=compute, rngs=rngs)

  def attend(self, q, k, v, ctx: Forward):
    """Attention of spike-coded `q, k, v` laid out `(..., G, N, heads, d)` (any leading dims)."""
    # On the grid (evaluation's static alpha = 1) the operands are exact multiples of their units.
    pair = lambda n1, n2: (n1.code_unit(q.dtype), n2.code_unit(q.dtype)) if ctx.on_grid else None
    scores = _product("...gnhd,...gmhd->...ghnm", q, k, ctx, self, "qk", pair(self.q_if, self.k_if))
    a = self.attn_if(scores * (2.0 ** -self.scale_log2), ctx)  # a shift
    return _product("...ghnm,...gmhd->...gnhd", a, v, ctx, self, "av", pair(self.attn_if, self.v_if))

  def attend_in_kernel(self, q, k, v, kind, alpha):
    """`ungroup(attend(group(q), ...))` for one part's `(B, H, W, c)` q, k, v in training's quantize
    mode, as one Pallas kernel each way (`attention_kernel`): the score maps stay on chip."""
    groups = 1 if kind is None else self.stride ** 2
    tokens = q.shape[1] * q.shape[2] // groups
    # The attention neuron's threshold as `attend` hands it the part's scores, (B, G, heads, N, N).
    lam = self.attn_if.training_threshold(groups * self.heads * tokens * tokens)
    return sharded_attention_core(q, k, v, lam, jnp.asarray(alpha, jnp.float32), kind, self.stride, self.heads,
                                  self.scale_log2, self.attn_if.T, self.attn_if.K, self.kernel == "interpret")

  def __call__(self, s, ctx: Forward, *, unit=None):
    """`s`: the block's input spikes (a SpikeTrain in spike mode); `unit`: their grid unit when
    they lie on it (`Forward.unit`)."""
    q = self.q_if(self.q(s, ctx, unit=unit), ctx)
    k = self.k_if(self.k(s, ctx, unit=unit), ctx)
    v = self.v_if(self.v(s, ctx, unit=unit), ctx)
    H, W = (q.spikes if isinstance(q, SpikeTrain) else q).shape[-3:-1]
    # Training's blend (quantize mode, off the grid, no statistics) may take the Pallas kernel;
    # evaluation and spike mode keep the XLA path, whose equalities the tests hold bit for bit.
    in_kernel = self.kernel != "xla" and ctx.mode == "quantize" and not ctx.collect and not ctx.on_grid
    outs, start = [], 0
    for kind, c in self.parts:   # at most two parts: the global and the local channels
      sl = lambda t, a=start, b=start + c: t[..., a:b]
      if in_kernel:
        outs.append(self.attend_in_kernel(sl(q), sl(k), sl(v), kind, ctx.alpha))
      else:
        group, ungroup = grouping(kind, self.stride, self.heads, H, W)
        g = [_tokens(t, lambda u: group(sl(u))) for t in (q, k, v)]
        outs.append(ungroup(self.attend(*g, ctx)))
      start += c
    o = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
    return self.proj(self.out_if(o, ctx), ctx, unit=ctx.unit(self.out_if, o.dtype))


class AttentionBlock(nnx.Module):
  """`Y = X + Proj(attention(IF(X))) + ConvBranch(IF(X))` (docs/math.md#gw-ssa-block, Eq. 8).

  The block owns its input neuron `IF`: one spike train feeds the attention's Q, K, V and the
  conv branch. conv_branch: 'dw' (depthwise 3x3, default), 'full' (dense 3x3) or 'none' (plain SSA).
  """

  def __init__(self, dim, heads, stride=None, global_frac=0.5, scale_log2=None, conv_branch="dw", *,
               neuron: dict, compute: Compute = Compute(), rngs: nnx.Rngs):
    if conv_branch not in ("dw", "full", "none"):
      raise ValueError(f"Unknown conv_branch {conv_branch!r}: use 'dw', 'full' or 'none'.")
    self.neuron = make_neuron(**neuron)
    self.attn = SpikingAttention(dim, heads, stride, global_frac, scale_log2, neuron=neuron, compute=compute,
                                 rngs=rngs)
    groups = dim if conv_branch == "dw" else 1
    self.conv = None if conv_branch == "none" else SynapticConv(dim, dim, 3, groups=groups, compute=compute,
                                                                rngs=rngs)

  def __call__(self, x, ctx: Forward):
    s = self.neuron(x, ctx)
    unit = ctx.unit(self.neuron, x.dtype)
    y = x + self.attn(s, ctx, unit=unit)
    if self.conv is not None:
      y = y + self.conv(s, ctx, unit=unit)
    return y
