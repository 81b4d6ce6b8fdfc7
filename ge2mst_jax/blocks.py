"""Synaptic layers and the convolutional blocks of Ge2mS-T (SPEC §3).

Every synaptic layer runs in two modes with one set of weights:
- `quantize`: `BN(conv(x))` on real activations (the quantizer outputs), training path. Given
  the presynaptic neuron's code scale `s = lam / Z`, it computes `conv(x / s, W) * s`: on the
  grid `x / s` is the integer code, exact in bfloat16 and at any matmul precision;
- `spike`: consumes a `SpikeTrain`; the kernel acts on each binary (or ternary) step `s_t`
  (additions only), the post-synaptic neuron integrates `sum_t theta_t (W s_t)`, and BatchNorm
  (running statistics) is the per-channel affine of that membrane (with the train's
  `integration='code'`, `W (sum_t theta_t s_t)`: the same sum regrouped, one pass);
- `stbp`: the baseline paradigm (`stbp.py`): `(T, B, ...)` LIF spikes, time folded into the
  batch, `BN(conv(s_t))` for every step, as multi-step STBP layers compute it.

Numerics (SPEC's equality, in every compute dtype): both modes hand the convolution the same
kernel, rounded once to the compute dtype, and an activation operand that is an exact small
integer (spikes, or codes <= Z <= 255 for T <= 8); products are accumulated in float32
(`preferred_element_type`) and everything after the convolution is float32. So the two modes
differ only in the order of float32 additions, whatever the dtype (bfloat16 included) and
whatever the backend's matmul precision (TF32, one bfloat16 pass) does to the operands.

With `collect=True` the layer sows into `SpikeStats` its exact synaptic-operation count
(spike mode; a total over the batch) and its dense MAC count per image (both modes);
`energy.py` aggregates them. Each layer traces under a named scope, its path in the network
(`scope`, set by the model): `audit.py` attributes the operations of a jaxpr to layers by it,
and so does a profiler. The counting itself runs under the scope `STATS_SCOPE`.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from ge2mst_jax.neurons import ExpGIF, SpikeStats, SpikeTrain, make_neuron, weighted_step_sum

_DN = ("NHWC", "HWIO", "NHWC")
_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
DEPTHWISE_SCOPE = "depthwise"   # the shifted multiplies of a depthwise convolution trace under it
STATS_SCOPE = "sop_count"       # the SOP / MAC counting of an instrumented pass traces under it


def named(scope: str):
  """`jax.named_scope(scope)`, or nothing for an unnamed (stand-alone) layer."""
  return jax.named_scope(scope) if scope else contextlib.nullcontext()


def acc_dtype(dtype) -> jnp.dtype:
  """The accumulation dtype of a synaptic op: float32, or float64 when verifying."""
  return jnp.promote_types(dtype, jnp.float32)


def conv2d(x, kernel, stride: int, groups: int):
  """NHWC convolution with symmetric 'same' padding (k // 2), identical in both modes.

  The result is accumulated and returned in `acc_dtype(x.dtype)` (float32 for bfloat16
  operands): a bfloat16 output would round every membrane to 8 bits, differently for the
  one-pass quantize sum and the T per-step spike sums. A depthwise kernel (one filter per
  channel) is applied as k*k shifted multiply-adds: XLA's CPU grouped convolution is several
  times slower, most of all in the backward pass.
  """
  k, acc = kernel.shape[0], acc_dtype(x.dtype)
  if k == 1 and groups == 1:
    # A 1x1 convolution is a matmul over channels. As a dot its gradients are dots too; XLA's
    # CPU convolution runs it 4-6x slower and its weight gradient as a conv with an HxW window.
    return jnp.einsum("...c,cd->...d", x[..., ::stride, ::stride, :], kernel[0, 0], preferred_element_type=acc)
  if groups > 1 and groups == x.shape[-1] == kernel.shape[-1] and kernel.shape[2] == 1:
    return depthwise_conv2d(x, kernel, stride)
  pad = ((k // 2, k // 2), (k // 2, k // 2))
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=_DN,
                                      feature_group_count=groups, preferred_element_type=acc)


def depthwise_conv2d(x, kernel, stride: int = 1):
  """Depthwise 'same' convolution as a sum of shifted, per-channel-scaled copies of `x`.

  Multiplied and summed in `acc_dtype` (a product of two bfloat16 values is exact in float32),
  like the other convolutions' `preferred_element_type`.
  """
  k, p = kernel.shape[0], kernel.shape[0] // 2
  H, W = x.shape[-3:-1]
  acc = acc_dtype(x.dtype)
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(p, p), (p, p), (0, 0)]).astype(acc)
  kernel = kernel.astype(acc)
  out = None
  with jax.named_scope(DEPTHWISE_SCOPE):
    for dy in range(k):
      for dx in range(k):
        term = xp[..., dy:dy + H:stride, dx:dx + W:stride, :] * kernel[dy, dx, 0]
        out = term if out is None else out + term
  return out


def integrate_steps(per_step: jax.Array, scale: jax.Array) -> jax.Array:
  """`sum_t theta_t y_t` with `theta_t = scale * 2^(T-t)`: shifts and adds, then one scale.

  The scale is the presynaptic `lam / Z`; it is folded into the next threshold on
  hardware, so the per-step work stays additions.
  """
  return weighted_step_sum(per_step) * scale.astype(per_step.dtype)


def spike_sops_conv(spikes: jax.Array, kernel_shape, stride: int, groups: int) -> jax.Array:
  """Exact accumulate count of a conv driven by `spikes` (T, B, H, W, Cin), batch total.

  Each non-zero input adds one weight to every output it reaches, so the count is the
  convolution of the per-element spike count with a ones kernel (borders and stride
  included), times the output channels per group.
  """
  k, _, cin_g, cout = kernel_shape
  counts = jnp.sum(jnp.abs(spikes), axis=0, dtype=jnp.float32)
  ones = jnp.ones((k, k, cin_g, groups), jnp.float32)
  reach = conv2d(counts, ones, stride, groups)
  return jnp.sum(reach) * (cout // groups)


def grid_scale(neuron, mode: str, dtype) -> jax.Array | None:
  """The code scale `lam / Z` of an ExpG-IF neuron's quantize-mode output, which a synaptic
  layer divides out before its convolution (see `SynapticConv`); None where there is none."""
  return neuron.code_scale(dtype) if mode == "quantize" and isinstance(neuron, ExpGIF) else None


class SynapticConv(nnx.Module):
  """Conv k x k (stride, groups) followed by BatchNorm; a linear layer is k = 1."""

  def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
               *, bn: bool = True, bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    if cin % groups or cout % groups:
      raise ValueError(f"SynapticConv: channels {cin}->{cout} not divisible by groups={groups}.")
    self.stride, self.groups, self.dtype = stride, groups, dtype
    # Activations stay float32 (float64 when verifying) whatever the conv's compute dtype.
    self.acc_dtype = acc_dtype(dtype)
    self.scope = ""   # the layer's path in the network, set by the model
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (kernel, kernel, cin // groups, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,))) if bias else None
    self.bn = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs) if bn else None

  def _macs(self, out_shape) -> float:
    k, _, cin_g, _ = self.kernel.shape
    return float(out_shape[-3] * out_shape[-2] * out_shape[-1] * k * k * cin_g)

  def _conv(self, x):
    return conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.groups)

  def _affine(self, y, running: bool | None = None):
    """Bias and BatchNorm of the membrane: the same float32 arithmetic in both modes.
    `running=True` forces the running statistics (inference) whatever the module's mode."""
    if self.bias is not None:
      y = y + self.bias[...]
    return self.bn(y, use_running_average=running) if self.bn is not None else y

  def __call__(self, x, *, mode: str = "quantize", collect: bool = False, in_scale=None):
    """`in_scale`: in quantize mode, the code scale of the neuron that produced `x` (`grid_scale`)."""
    with named(self.scope):
      if mode == "stbp":
        T = x.shape[0]
        y = self._quantize(x.reshape(-1, *x.shape[2:]), None, collect)
        if collect:
          with jax.named_scope(STATS_SCOPE):
            self.sow(SpikeStats, "sops", spike_sops_conv(x, self.kernel.shape, self.stride, self.groups))
        return y.reshape(T, -1, *y.shape[1:])
      if mode == "spike":
        return self._spike(x, collect)
      if isinstance(x, SpikeTrain):
        raise TypeError("SynapticConv got a SpikeTrain in quantize mode: call every layer with the same mode.")
      return self._quantize(x, in_scale, collect)

  def _quantize(self, x, in_scale, collect):
    if in_scale is None:
      y = self._conv(x)
    else:
      # conv(x / s, W) * s == conv(x, W); s cancels, so its gradient path is cut. On the grid x / s
      # is the integer code: the conv then sees what spike mode's integrated steps add up to.
      s = jax.lax.stop_gradient(in_scale).astype(x.dtype)
      y = self._conv(x / s) * s.astype(self.acc_dtype)
    y = self._affine(y.astype(self.acc_dtype))
    if collect:
      self.sow(SpikeStats, "macs", jnp.asarray(self._macs(y.shape), jnp.float32))
    return y

  def _spike(self, x, collect):
    if not isinstance(x, SpikeTrain):
      raise TypeError("SynapticConv in spike mode consumes a SpikeTrain (the output of an ExpG-IF layer).")
    # 'code': the layer is linear, W (sum_t theta_t s_t) = sum_t theta_t (W s_t): one step, the code.
    steps = x.code()[None] if x.integration == "code" else x.spikes
    T, B = steps.shape[:2]
    y = self._conv(steps.reshape(T * B, *steps.shape[2:]))
    # Spike mode is inference: BatchNorm's running statistics, as a per-channel affine of the membrane
    # (on a chip, folded into the threshold). Not folded into the kernel: that would round the kernel
    # to the compute dtype differently from quantize mode.
    y = self._affine(integrate_steps(y.reshape(T, B, *y.shape[1:]), x.scale), running=True)
    if collect:
      with jax.named_scope(STATS_SCOPE):
        self.sow(SpikeStats, "sops", spike_sops_conv(x.spikes, self.kernel.shape, self.stride, self.groups))
        self.sow(SpikeStats, "macs", jnp.asarray(self._macs(y.shape), jnp.float32))
    return y


class SConv(nnx.Module):
  """A spiking convolution: ExpG-IF, then conv + BN (SPEC §3: Stage 1, down-sampling)."""

  def __init__(self, cin, cout, kernel=3, stride=1, groups=1, *, neuron: dict, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.neuron = make_neuron(**neuron)
    self.conv = SynapticConv(cin, cout, kernel, stride, groups, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, mode="quantize", alpha=1.0, collect=False):
    h = self.neuron(x, mode=mode, alpha=alpha, collect=collect)
    return self.conv(h, mode=mode, collect=collect, in_scale=grid_scale(self.neuron, mode, x.dtype))


class SFFN(nnx.Module):
  """`X + BN(1x1(IF(BN(DW3x3(IF(BN(1x1_{C->rC}(IF(X)))))))))` (Conv-SFFN, SPEC §3, Eq. 9).

  With `depthwise=False` the middle depthwise stage is dropped: the plain SFFN.
  """

  def __init__(self, dim: int, ratio: int = 4, depthwise: bool = True, *, neuron: dict,
               dtype=jnp.float32, rngs: nnx.Rngs):
    hidden = dim * ratio
    self.fc1 = SConv(dim, hidden, 1, neuron=neuron, dtype=dtype, rngs=rngs)
    self.dw = SConv(hidden, hidden, 3, groups=hidden, neuron=neuron, dtype=dtype, rngs=rngs) if depthwise else None
    self.fc2 = SConv(hidden, dim, 1, neuron=neuron, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, mode="quantize", alpha=1.0, collect=False):
    kw = dict(mode=mode, alpha=alpha, collect=collect)
    h = self.fc1(x, **kw)
    if self.dw is not None:
      h = self.dw(h, **kw)
    return x + self.fc2(h, **kw)


class Stem(nnx.Module):
  """The real-valued first convolution (k x k, stride) + BN: its input is the image, not spikes.

  Identical in both modes; its MACs are reported apart from the SOPs (SPEC §4).
  """

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = SynapticConv(cin, cout, kernel, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, mode="quantize", collect=False):
    del mode  # the stem is not a spiking layer
    return self.conv(x, mode="quantize", collect=collect)


class EventFrameAdapter(nnx.Module):
  """Merges event-camera frames `[B, T_in, H, W, 2]` into a 3-channel image (SPEC §3).

  A 3x3 convolution over time x polarity (`T_in * 2` input channels) + BN, real-valued
  like the stem, so that an ImageNet-trained stem and network can be fine-tuned on it.
  """

  def __init__(self, frames: int, polarities: int = 2, out_channels: int = 3, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.frames, self.polarities = frames, polarities
    self.conv = SynapticConv(frames * polarities, out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, events, *, collect=False):
    if events.ndim != 5 or events.shape[1] != self.frames or events.shape[-1] != self.polarities:
      raise ValueError(f"Event input must be [B, {self.frames}, H, W, {self.polarities}], got {tuple(events.shape)}.")
    B, T_in, H, W, P = events.shape
    x = jnp.transpose(events, (0, 2, 3, 1, 4)).reshape(B, H, W, T_in * P)
    return self.conv(x, mode="quantize", collect=collect)
