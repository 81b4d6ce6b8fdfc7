"""Synaptic layers and the convolutional blocks of Ge2mS-T (docs/math.md#network).

Every synaptic layer runs in two modes with one set of weights:
- `quantize`: `BN(conv(x))` on real activations (the quantizer outputs), training path;
- `spike`: consumes a `SpikeTrain`; the kernel acts on each binary (or ternary) step `s_t`
  (additions only), the post-synaptic neuron integrates `sum_t theta_t (W s_t)` (with the
  train's `integration='code'`, `W (sum_t theta_t s_t)`: the same sum regrouped, one pass),
  then bias and BatchNorm (running statistics) as in quantize mode;
- `stbp`: the baseline paradigm (`stbp.py`): `(T, B, ...)` LIF spikes, time folded into the
  batch, `BN(conv(s_t))` for every step, as multi-step STBP layers compute it.

Every module takes the pass's `Forward` context (`spiking/forward.py`: mode, alpha, whether to
collect statistics, whether neuron outputs lie on their grids), built once by the network. With
`ctx.collect` the layer sows into `SpikeStats` its exact synaptic-operation count (spike mode; a
total over the batch) and its dense MAC count per image (both modes); `energy.py` aggregates them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.neurons import ExpGIF, SpikeTrain, grid_codes, weighted_step_sum
from ge2mst_jax.spiking.spike_stats import SpikeStats
from ge2mst_jax.spiking.stbp import LIF, PARADIGMS


def make_neuron(paradigm: str = "expg", lif: dict | None = None, **expg):
  """The neuron layer of a training paradigm: `ExpGIF(**expg)`, or for 'stbp' a multi-step
  LIF (`stbp.LIF(T, **lif)`) trained by backpropagation through time."""
  if paradigm == "expg":
    return ExpGIF(**expg)
  if paradigm == "stbp":
    return LIF(expg["T"], symmetric=expg.get("symmetric", False), **(lif or {}))
  raise ValueError(f"Unknown paradigm {paradigm!r}: use one of {PARADIGMS}.")


def name_layers(network: nnx.Module, kinds: tuple) -> None:
  """Gives every module of `kinds` in `network` its path ('stages.2.1.attn.q', the name
  energy reports use) as the `jax.named_scope` of its operations: traced programs, profiles and
  the spike audit then say which layer an operation belongs to."""
  for path, module in nnx.iter_graph(network):
    if isinstance(module, kinds):
      module.scope = ".".join(map(str, path))


DEPTHWISE = ("shifts", "conv")
ATTENTION_KERNELS = ("xla", "pallas", "interpret")
KERNEL_GRADS = ("conv", "taps")
SYNAPTIC_OUT = "synaptic_out"   # the checkpoint name of a synaptic layer's sum, before BatchNorm


def remat_policy(prim, *_, **params) -> bool:
  """What a rematerialised block keeps for its backward pass: each synaptic layer's sum (in the
  activation dtype) and the reductions (BatchNorm's statistics: a few numbers per channel).
  BatchNorm, the neurons and the quantized activations the next layer reads are recomputed from
  them in the backward pass: fewer temporaries for more HBM traffic (the recompute reads the sums
  again) and a little more compute, so it is for a network that does not fit otherwise."""
  if prim.name == "name":
    return params["name"] == SYNAPTIC_OUT
  return prim.name.startswith("reduce_")


@dataclasses.dataclass(frozen=True)
class Compute:
  """How a synaptic layer computes, the same in every mode: `Numerics.compute()`, with its choices
  checked and resolved (the defaults here serve single layers built in tests).

  dtype: the convolution's operands (kernel and input). Products accumulate in at least float32.
  activations: the dtype a layer hands on (its output after BatchNorm, the residual stream,
    neuron outputs); None: `dtype`. bf16 activations halve the bytes every elementwise op,
    BatchNorm and saved residual moves, which bound an accelerator's step; float32 keeps them
    float32 beside bf16 synapses.
  depthwise: 'shifts' (k*k shifted multiply-adds: XLA:CPU's grouped convolution is several
    times slower) or 'conv' (a grouped convolution, what TPUs and GPUs run best).
  kernel_grad: how a dense k x k convolution's kernel gradient is computed: 'conv' (XLA's
    convolution over the output's whole window, what TPUs and GPUs run best) or 'taps' (one
    matmul per kernel tap, `conv_kernel_grad`: what XLA:CPU runs at its matmul rate).
  attention: GW-SSA's training-time core (scores, attention neuron, values): 'xla' (einsums) or
    'pallas' (`attention_kernel`: the score maps stay on chip; TPU), 'interpret' (that kernel
    through Pallas's interpreter, any backend: for tests).
  """
  dtype: Any = jnp.float32
  activations: Any = None
  depthwise: str = "shifts"
  kernel_grad: str = "conv"
  attention: str = "xla"

  @property
  def acc_dtype(self):
    return jnp.promote_types(self.dtype, jnp.float32)

  @property
  def out_dtype(self):
    return jnp.dtype(self.dtype if self.activations is None else self.activations)


DTYPES = ("float32", "bfloat16", "float64")
REMATS = ("none", "block")


@dataclasses.dataclass(frozen=True)
class Numerics:
  """How a network computes: dtypes, kernel backends and training memory. Every choice is checked
  here, once; `compute()` resolves 'same' and 'auto' into the layers' `Compute`."""
  dtype: str = "float32"                      # synaptic compute: 'float32' | 'bfloat16' | 'float64' (checks; x64)
  # The dtype layers hand on (residual stream, BatchNorm and neuron outputs): 'same' (= dtype) or one of the
  # above; 'float32' with dtype 'bfloat16' keeps float32 activations beside bf16 synapses.
  activation_dtype: str = "same"
  # Depthwise convolutions: 'shifts' (shifted multiply-adds, fastest on CPU) | 'conv' (a grouped conv, for
  # TPU/GPU) | 'auto' ('shifts' where JAX's default backend is the CPU, else 'conv'; decided at build time).
  depthwise: str = "auto"
  # Dense convolutions' kernel gradients: 'conv' (XLA's convolution; for TPU/GPU) | 'taps' (one matmul per kernel
  # tap, faster on XLA:CPU; the same gradients up to float rounding) | 'auto' ('taps' on the CPU, else 'conv').
  conv_kernel_grad: str = "auto"
  # GW-SSA's training-time core (Q K^T, the attention neuron, A V; forward and backward): 'xla' (einsums,
  # the score maps written out between fusions) | 'pallas' (one Pallas TPU kernel each way, the score maps
  # kept on chip; TPU only) | 'interpret' (that kernel interpreted, any backend: slow, for tests) | 'auto'
  # ('pallas' where JAX's default backend is a TPU, else 'xla'). Evaluation and spike mode always use 'xla'.
  attention_kernel: str = "auto"
  # Training memory: 'none' (autodiff keeps what it keeps) | 'block' (each block rematerialised, keeping only
  # its synaptic sums and BatchNorm statistics: less memory for somewhat more HBM traffic and compute; for
  # a network that does not fit otherwise).
  remat: str = "none"

  def __post_init__(self):
    for name, choices in (("dtype", DTYPES), ("activation_dtype", ("same",) + DTYPES), ("remat", REMATS),
                          ("depthwise", ("auto",) + DEPTHWISE), ("conv_kernel_grad", ("auto",) + KERNEL_GRADS),
                          ("attention_kernel", ("auto",) + ATTENTION_KERNELS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name}={getattr(self, name)!r}: use one of {choices}.")
    if "float64" in (self.dtype, self.activation_dtype) and not jax.config.jax_enable_x64:
      raise ValueError("dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or run inside "
                       "`with jax.enable_x64(True):`.")

  def compute(self) -> "Compute":
    """The layers' `Compute`: 'same' and 'auto' resolved for JAX's default backend."""
    backend = jax.default_backend()
    cpu = backend == "cpu"
    depthwise = ("shifts" if cpu else "conv") if self.depthwise == "auto" else self.depthwise
    kernel_grad = ("taps" if cpu else "conv") if self.conv_kernel_grad == "auto" else self.conv_kernel_grad
    attention = ("pallas" if backend == "tpu" else "xla") if self.attention_kernel == "auto" else self.attention_kernel
    act = self.dtype if self.activation_dtype == "same" else self.activation_dtype
    return Compute(jnp.dtype(self.dtype), jnp.dtype(act), depthwise, kernel_grad, attention)


def float32_matmul_follows_precision() -> bool:
  """Whether this backend computes a float32 product differently at 'bfloat16' and 'highest'
  precision (XLA:CPU does not: it computes float32 in full whatever the setting), checked on a
  product whose operands bfloat16 cannot hold."""
  a, b = jax.random.normal(jax.random.key(0), (64, 64)), jax.random.normal(jax.random.key(1), (64, 64))
  product = jax.jit(lambda a, b: a @ b)
  with jax.default_matmul_precision("bfloat16"):
    low = product(a, b)
  with jax.default_matmul_precision("highest"):
    high = product(a, b)
  return not bool(jnp.array_equal(low, high))


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` (the same variables, modes and arithmetic, op for op) that replaces its
  running statistics whole in training instead of through flax's `[...] =`.

  Why: that assignment asks the traced value for its `.sharding`, and the AttributeError JAX
  raises for a tracer first walks the whole program traced so far to say where the value came
  from. Twice per layer and step, and the walk grows with the program, so it dominates tracing
  a large train step.
  It covers what the layers here use (features on the last axis, scale and bias, no `axis_name`:
  under jit the SPMD partitioner makes the statistics global); anything else is flax's own call.
  """

  def __call__(self, x, use_running_average: bool | None = None):
    running = self.use_running_average if use_running_average is None else use_running_average
    ours = self.axis in (-1, x.ndim - 1) and self.axis_name is None and self.use_scale and self.use_bias
    if running or not ours:
      return super().__call__(x, use_running_average=running)
    old_mean, old_var = self.mean.get_value(), self.var.get_value()
    params = (x, old_mean, old_var, self.scale[...], self.bias[...])
    dtype = jnp.result_type(*params)   # flax promotes the input and all variables together
    x, _, _, scale, bias = (jnp.asarray(a, dtype) for a in params)
    axes = tuple(range(x.ndim - 1))
    stats = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))   # at least float32, as flax
    mean, mean_sq = stats.mean(axes), jax.lax.square(stats).mean(axes)
    var = jnp.maximum(0.0, mean_sq - jax.lax.square(mean))   # flax's fast variance
    m = self.momentum
    self.mean.set_value(jax.lax.stop_gradient(m * old_mean + (1 - m) * mean).astype(old_mean.dtype))
    self.var.set_value(jax.lax.stop_gradient(m * old_var + (1 - m) * var).astype(old_var.dtype))
    return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


_DN = ("NHWC", "HWIO", "NHWC")
_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def conv2d(x, kernel, stride: int, groups: int, acc_dtype=None, depthwise: str = "shifts",
           kernel_grad: str = "conv"):
  """NHWC convolution with symmetric 'same' padding (k // 2), identical in both modes.

  `acc_dtype`: the dtype products are accumulated and returned in (default: the operands').
  bf16 operands with float32 accumulation is what the MXU and tensor cores do natively; it
  also keeps the sum of a bf16 layer from being rounded to bf16 once per spike step.
  A depthwise kernel (one filter per channel) is applied as k*k shifted multiply-adds with
  `depthwise='shifts'` (XLA's CPU grouped convolution is several times slower, most of all in
  the backward pass), as a grouped convolution with 'conv'. `kernel_grad='taps'`: a dense
  kernel's gradient as one matmul per tap (`conv_kernel_grad`); the forward pass is the same.
  """
  k = kernel.shape[0]
  if k == 1 and groups == 1:
    # A 1x1 convolution is a matmul over channels. As a dot its gradients are dots too; XLA's
    # CPU convolution runs it several times slower and its weight gradient as a conv with an HxW window.
    return jnp.einsum("...c,cd->...d", x[..., ::stride, ::stride, :], kernel[0, 0], preferred_element_type=acc_dtype)
  if depthwise == "shifts" and groups > 1 and groups == x.shape[-1] == kernel.shape[-1] and kernel.shape[2] == 1:
    return depthwise_conv2d(x, kernel, stride, acc_dtype)
  # An image's 3 channels make every tap's product 3 rows tall; XLA's convolution is as fast there.
  if kernel_grad == "taps" and groups == 1 and kernel.shape[2] >= 8:
    return _conv_tap_grads(x, kernel, stride, acc_dtype)
  return _conv(x, kernel, stride, groups, acc_dtype)


def _conv(x, kernel, stride, groups, acc_dtype):
  k = kernel.shape[0]
  pad = ((k // 2, k // 2), (k // 2, k // 2))
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=_DN,
                                      feature_group_count=groups, preferred_element_type=acc_dtype)


def conv_kernel_grad(x, g, k: int, stride: int = 1):
  """The kernel gradient of a 'same' k x k convolution `y = conv2d(x, kernel, stride, 1)` with
  output cotangent `g`: for each tap, the input pixels that tap reads times `g`, summed over
  batch and pixels: `k*k` matmuls `[C_out, N] @ [N, C_in]`, N = batch x output pixels.

  XLA's own form is a convolution whose window is the whole output map, which XLA:CPU runs at
  a fraction of its matmul rate. Products accumulate in at least float32; returns
  `[k, k, C_in, C_out]` in that dtype.
  """
  acc = jnp.promote_types(jnp.result_type(x, g), jnp.float32)
  # g first: the dot reads x's pixels as rows, no transpose.
  taps = [jnp.einsum("...hwd,...hwc->dc", g, window, preferred_element_type=acc)
          for window in _tap_windows(x, k, stride, g.shape[-3:-1])]
  return jnp.stack(taps).reshape(k, k, g.shape[-1], x.shape[-1]).swapaxes(-1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grads(x, kernel, stride, acc_dtype):
  return _conv(x, kernel, stride, 1, acc_dtype)


def _conv_tap_grads_fwd(x, kernel, stride, acc_dtype):
  return _conv(x, kernel, stride, 1, acc_dtype), (x, kernel)


def _conv_tap_grads_bwd(stride, acc_dtype, res, g):
  x, kernel = res
  (dx,) = jax.vjp(lambda x: _conv(x, kernel, stride, 1, acc_dtype), x)[1](g)   # XLA's input gradient
  return dx, conv_kernel_grad(x, g, kernel.shape[0], stride).astype(kernel.dtype)


_conv_tap_grads.defvjp(_conv_tap_grads_fwd, _conv_tap_grads_bwd)


def depthwise_conv2d(x, kernel, stride: int = 1, acc_dtype=None):
  """Depthwise 'same' convolution as a sum of shifted, per-channel-scaled copies of `x`.

  The products and their sum are formed in `acc_dtype`: a bf16 product of two bf16 values is
  exact in float32, so only the additions round, as in a convolution unit. Named scope
  'depthwise': these multiplies are synaptic operations (the spike audit looks for them).
  """
  if acc_dtype is not None:
    x, kernel = x.astype(acc_dtype), kernel.astype(acc_dtype)
  return _depthwise_same(x, kernel) if stride == 1 else _shifted_sum(x, kernel, stride)


def _tap_windows(x, k: int, stride: int, out_hw) -> list:
  """The window of `x` (zero-padded 'same') that each tap of a k x k kernel reads for an output
  of spatial size `out_hw`, in the kernel's (dy, dx) order."""
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(k // 2, k // 2)] * 2 + [(0, 0)])
  span_h, span_w = (stride * (n - 1) + 1 for n in out_hw)
  return [xp[..., dy:dy + span_h:stride, dx:dx + span_w:stride, :] for dy in range(k) for dx in range(k)]


def _shifted_sum(x, kernel, stride):
  k, (H, W) = kernel.shape[0], x.shape[-3:-1]
  out = None
  with jax.named_scope("depthwise"):
    for i, window in enumerate(_tap_windows(x, k, stride, (-(-H // stride), -(-W // stride)))):
      term = window * kernel[i // k, i % k, 0]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _depthwise_same(x, kernel):
  """Stride 1. Autodiff of the shifted sum makes XLA:CPU write each of the k*k shifted copies of
  `x` out for the kernel gradient; this backward pass reads `x` in place."""
  return _shifted_sum(x, kernel, 1)


def _depthwise_same_fwd(x, kernel):
  return _shifted_sum(x, kernel, 1), (x, kernel)


def _depthwise_same_bwd(res, g):
  x, kernel = res
  dx = _shifted_sum(g, kernel[::-1, ::-1], 1)   # a correlation's transpose: the flipped kernel
  batch = tuple(range(x.ndim - 1))
  dk = jnp.stack([jnp.sum(w * g, axis=batch) for w in _tap_windows(x, kernel.shape[0], 1, x.shape[-3:-1])])
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_same.defvjp(_depthwise_same_fwd, _depthwise_same_bwd)


def integrate_steps(per_step: jax.Array, scale: jax.Array) -> jax.Array:
  """`sum_t theta_t y_t` with `theta_t = scale * 2^(T-t)`: shifts and adds, then one scale.

  The scale is the presynaptic `lam / Z`; it is folded into the next threshold on
  hardware, so the per-step work stays additions.
  """
  return weighted_step_sum(per_step) * scale.astype(per_step.dtype)


def fold_steps(x: jax.Array) -> jax.Array:
  """`(T, B, ...)` -> `(B * T, ...)`, batch-major, so that one layer call serves every step.

  Batch-major keeps each device's images contiguous: with the batch sharded over devices, the
  step-major `(T * B)` merge cannot be sharded like its input, and XLA's partitioner gathers
  the whole batch onto every device (each then computes all of it). On one device the two
  orders cost the same.
  """
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def unfold_steps(y: jax.Array, T: int) -> jax.Array:
  """The inverse of `fold_steps`: `(B * T, ...)` -> `(T, B, ...)`."""
  return jnp.swapaxes(y.reshape(-1, T, *y.shape[1:]), 0, 1)


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


def sow_inputs(owner: nnx.Module, spikes: jax.Array, prefix: str = "") -> None:
  """Sows what the hardware energy model reads of a layer's input spike train `(T, B, ...)`: its
  neurons (batch total, one step) and its non-zero spikes over the T steps (batch total)."""
  owner.sow(SpikeStats, f"{prefix}inputs", jnp.asarray(spikes[0].size, jnp.float32))
  owner.sow(SpikeStats, f"{prefix}in_spikes", jnp.sum(jnp.abs(spikes), dtype=jnp.float32))


class SynapticConv(nnx.Module):
  """Conv k x k (stride, groups) followed by BatchNorm; a linear layer is k = 1."""

  def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
               *, bn: bool = True, bias: bool = False, compute: Compute = Compute(), rngs: nnx.Rngs):
    if cin % groups or cout % groups:
      raise ValueError(f"SynapticConv: channels {cin}->{cout} not divisible by groups={groups}.")
    self.stride, self.groups, self.dtype, self.depthwise = stride, groups, jnp.dtype(compute.dtype), compute.depthwise
    self.kernel_grad = compute.kernel_grad
    self.acc_dtype, self.out_dtype = compute.acc_dtype, compute.out_dtype
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (kernel, kernel, cin // groups, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,))) if bias else None
    self.bn = BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs) if bn else None
    self.scope = "synaptic"   # its path once in a network (`name_layers`): the jaxpr names the layer

  def _macs(self, out_shape) -> float:
    k, _, cin_g, _ = self.kernel.shape
    return float(out_shape[-3] * out_shape[-2] * out_shape[-1] * k * k * cin_g)

  def __call__(self, x, ctx: Forward, *, unit=None):
    """`unit`: in quantize mode, the grid unit of a neuron output `x` lying on its grid
    (`Forward.unit`): the layer then runs on the integer codes and scales once, the
    arithmetic of spike mode, so that both modes agree in bf16 too."""
    with jax.named_scope(self.scope):
      return self._forward(x, ctx, unit)

  def _forward(self, x, ctx, unit):
    if ctx.mode == "stbp":   # time folded into the batch: BN(conv(s_t)) for every step at once
      y = unfold_steps(self._dense(fold_steps(x), None, ctx.collect), x.shape[0])
      if ctx.collect:
        self.sow(SpikeStats, "sops", spike_sops_conv(x, self.kernel.shape, self.stride, self.groups))
      return y
    if ctx.mode == "spike":
      if not isinstance(x, SpikeTrain):
        raise TypeError("SynapticConv in spike mode consumes a SpikeTrain (the output of an ExpG-IF layer).")
      # 'code': the layer is linear, W (sum_t theta_t s_t) = sum_t theta_t (W s_t): one step, the code.
      steps = x.code()[None] if x.integration == "code" else x.spikes
      s = fold_steps(steps).astype(self.dtype)
      y = conv2d(s, self.kernel[...].astype(self.dtype), self.stride, self.groups, self.acc_dtype, self.depthwise)
      y = integrate_steps(unfold_steps(y, steps.shape[0]), x.scale)
      if ctx.collect:
        self.sow(SpikeStats, "sops", spike_sops_conv(x.spikes, self.kernel.shape, self.stride, self.groups))
        sow_inputs(self, x.spikes)
      return self._finish(y, True, ctx.collect)
    if isinstance(x, SpikeTrain):
      raise TypeError("SynapticConv got a SpikeTrain in quantize mode: call every layer with the same mode.")
    return self._dense(x, unit, ctx.collect)

  def _dense(self, x, unit, collect):
    """The layer on real activations (quantize mode; each step of stbp): conv, bias, BatchNorm."""
    xs = x if unit is None else grid_codes(x, unit)
    y = conv2d(xs.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.groups, self.acc_dtype,
               self.depthwise, self.kernel_grad)
    if unit is not None:
      y = y * unit.astype(self.acc_dtype)
    return self._finish(y, False, collect)

  def _finish(self, y, running: bool, collect):
    # Bias and BatchNorm after the accumulation, the same arithmetic in both modes (spike mode on
    # the running statistics: inference; on a chip they fold into the next neuron's threshold).
    # Folded into a bf16 kernel instead, they would round other weights than quantize mode's and
    # bf16 predictions would disagree between the modes. The sum is rounded to the activation
    # dtype once, in both modes, before BatchNorm (which computes in float32).
    y = checkpoint_name(y.astype(self.out_dtype), SYNAPTIC_OUT)
    if self.bias is not None:
      y = y + self.bias[...]
    if self.bn is not None:
      y = self.bn(y, use_running_average=True) if running else self.bn(y)
    y = y.astype(self.out_dtype)
    if collect:
      self.sow(SpikeStats, "macs", jnp.asarray(self._macs(y.shape), jnp.float32))
    return y


class SConv(nnx.Module):
  """A spiking convolution: ExpG-IF, then conv + BN (docs/math.md#feed-forward-blocks: Stage 1, down-sampling)."""

  def __init__(self, cin, cout, kernel=3, stride=1, groups=1, *, neuron: dict, compute: Compute = Compute(),
               rngs: nnx.Rngs):
    self.neuron = make_neuron(**neuron)
    self.conv = SynapticConv(cin, cout, kernel, stride, groups, compute=compute, rngs=rngs)

  def __call__(self, x, ctx: Forward):
    s = self.neuron(x, ctx)
    return self.conv(s, ctx, unit=ctx.unit(self.neuron, x.dtype))


class SFFN(nnx.Module):
  """`X + BN(1x1(IF(BN(DW3x3(IF(BN(1x1_{C->rC}(IF(X)))))))))` (Conv-SFFN, docs/math.md#feed-forward-blocks, Eq. 9).

  With `depthwise=False` the middle depthwise stage is dropped: the plain SFFN.
  """

  def __init__(self, dim: int, ratio: int = 4, depthwise: bool = True, *, neuron: dict,
               compute: Compute = Compute(), rngs: nnx.Rngs):
    hidden = dim * ratio
    self.fc1 = SConv(dim, hidden, 1, neuron=neuron, compute=compute, rngs=rngs)
    self.dw = SConv(hidden, hidden, 3, groups=hidden, neuron=neuron, compute=compute, rngs=rngs) if depthwise else None
    self.fc2 = SConv(hidden, dim, 1, neuron=neuron, compute=compute, rngs=rngs)

  def __call__(self, x, ctx: Forward):
    h = self.fc1(x, ctx)
    if self.dw is not None:
      h = self.dw(h, ctx)
    return x + self.fc2(h, ctx)


class Stem(nnx.Module):
  """The real-valued first convolution (k x k, stride) + BN: its input is the image, not spikes.

  Identical in both modes; its MACs are reported apart from the SOPs (docs/math.md#energy).
  """

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, compute: Compute = Compute(), rngs: nnx.Rngs):
    self.conv = SynapticConv(cin, cout, kernel, stride, compute=compute, rngs=rngs)

  def __call__(self, x, ctx: Forward = Forward.of()):
    # Not a spiking layer: quantize mode's arithmetic whatever the pass's mode.
    return self.conv(x, Forward.of(collect=ctx.collect))


class EventFrameAdapter(nnx.Module):
  """Merges event-camera frames `[B, T_in, H, W, 2]` into a 3-channel image (docs/math.md#event-input).

  A 3x3 convolution over time x polarity (`T_in * 2` input channels) + BN, real-valued
  like the stem, so that an ImageNet-trained stem and network can be fine-tuned on it.
  """

  def __init__(self, frames: int, polarities: int = 2, out_channels: int = 3, *, compute: Compute = Compute(),
               rngs: nnx.Rngs):
    self.frames, self.polarities = frames, polarities
    self.conv = SynapticConv(frames * polarities, out_channels, 3, compute=compute, rngs=rngs)

  def __call__(self, events, ctx: Forward = Forward.of()):
    if events.ndim != 5 or events.shape[1] != self.frames or events.shape[-1] != self.polarities:
      raise ValueError(f"Event input must be [B, {self.frames}, H, W, {self.polarities}], got {tuple(events.shape)}.")
    B, T_in, H, W, P = events.shape
    x = jnp.transpose(events, (0, 2, 3, 1, 4)).reshape(B, H, W, T_in * P)
    return self.conv(x, Forward.of(collect=ctx.collect))   # real-valued, like the stem
