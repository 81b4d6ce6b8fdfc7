"""The staged Ge2mS-T network and its model family (SPEC §3).

    stem (real conv) -> Stage 1: SConv up, SConv down, SFFN
                     -> Stage 2: SConv stride 2, [GW-SSA(s2) + Conv-SFFN] x d2
                     -> Stage 3: SConv stride 2, [GW-SSA(s3) + Conv-SFFN] x d3
                     -> Stage 4: SConv stride 2, [SSA + SFFN] x d4
                     -> ExpG-IF -> global average pool -> linear classifier

`model(images, mode='quantize' | 'spike')` computes the same function in both modes:
quantizers during training, T-step spike trains at inference.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ge2mst_jax.nn.attention import AttentionBlock, SpikingAttention, check_divisible
from ge2mst_jax.nn.blocks import (ATTENTION_KERNELS, DEPTHWISE, KERNEL_GRADS, PARADIGMS, SFFN, Compute, EventFrameAdapter,
                               SConv, Stem, SynapticConv, make_neuron, name_layers, remat_policy)
from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.neurons import INTEGRATIONS, METHODS, check_tk
from ge2mst_jax.spiking.stbp import RESETS, SURROGATES

REMATS = ("none", "block")


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """Everything that shapes a Ge2mS-T network. Fields marked (reading) follow SPEC's reconstruction."""
  stem_width: int = 32
  widths: tuple = (48, 96, 192, 384)          # stages 1..4 (reading: 3:4:5 base widths)
  depths: tuple = (1, 3, 4, 1)                # blocks per stage (stage 1: SFFN blocks)
  heads: tuple = (1, 2, 4)                    # stages 2, 3, 4 (per GW-SSA part)
  gw_strides: tuple = (4, 2)                  # stages 2, 3 (reading: 7x7 tokens per group at 224²)
  global_frac: float = 0.5                    # (reading) share of channels in the global groups
  conv_branch: str = "dw"                     # (reading) GW-SSA conv branch: 'dw' | 'full' | 'none'
  attn_scale_log2: int | None = None          # 2^-m scale of Q K^T; None: round(log2(head_dim) / 2)
  ffn_ratio: int = 4
  stage1_expand: int = 4                      # (reading) channel up-sampling of Stage 1's first SConv
  stem_kernel: int = 7
  stem_stride: int = 2
  stage1_stride: int = 2
  image_size: int = 224
  in_channels: int = 3
  event_frames: int = 0                       # > 0: event input [B, frames, H, W, 2] through the adapter
  T: int = 4
  K: int = 2
  lam_init: float = 1.0
  # Level search, one result: 'search' (binary) | 'compare' (a chain over the |L|-1 thresholds; fastest
  # on CPU up to T=8) | 'arith' (bit arithmetic, cost flat in T; faster on CPU from T of about 10, K=2).
  quantizer: str = "compare"
  emitter: str = "bits"                       # spike emission: 'bits' (vectorised) | 'scan' (IF loop; same spikes)
  # Spike-mode synapses: 'steps' (each layer on every binary step, then integrated, as a chip does) |
  # 'code' (each layer once on the decoded train: the same linear sum regrouped, ~T x less work).
  spike_integration: str = "steps"
  dtype: str = "float32"                      # synaptic compute: 'float32' | 'bfloat16' | 'float64' (checks; x64)
  # The dtype layers hand on (residual stream, BatchNorm and neuron outputs): 'same' (= dtype) or one of the
  # above; 'float32' with dtype 'bfloat16' keeps float32 activations beside bf16 synapses.
  activation_dtype: str = "same"
  # Depthwise convolutions: 'shifts' (shifted multiply-adds, fastest on CPU) | 'conv' (a grouped conv, for
  # TPU/GPU) | 'auto' ('shifts' where JAX's default backend is the CPU, else 'conv'; decided at build time).
  depthwise: str = "auto"
  # Dense convolutions' kernel gradients: 'conv' (XLA's convolution; for TPU/GPU) | 'taps' (one matmul per kernel
  # tap, 1.6-3x faster on XLA:CPU; the same gradients up to float rounding) | 'auto' ('taps' on the CPU, else 'conv').
  conv_kernel_grad: str = "auto"
  # GW-SSA's training-time core (Q K^T, the attention neuron, A V; forward and backward): 'xla' (einsums,
  # the score maps written out between fusions) | 'pallas' (one Pallas TPU kernel each way, the score maps
  # kept on chip; TPU only) | 'interpret' (that kernel interpreted, any backend: slow, for tests) | 'auto'
  # ('pallas' where JAX's default backend is a TPU, else 'xla'). Evaluation and spike mode always use 'xla'.
  attention_kernel: str = "auto"
  # Training memory: 'none' (autodiff keeps what it keeps) | 'block' (each block rematerialised, keeping only
  # its synaptic sums and BatchNorm statistics: about half the memory, ~10 % more HBM traffic and a little
  # more compute; for a network that does not fit otherwise, e.g. ge2mst_large at 256 images per v5e chip).
  remat: str = "none"
  # Training paradigm: 'expg' (ExpG-IF quantizers, the paper) | 'stbp' (multi-step LIF + BPTT baseline).
  paradigm: str = "expg"
  lif_tau: float = 2.0                        # stbp: membrane time constant
  lif_threshold: float = 0.5                  # stbp: firing threshold v_th (at 1.0 a fresh net barely fires)
  lif_reset: str = "soft"                     # stbp: 'soft' (subtract v_th) | 'hard' (to 0)
  surrogate: str = "sigmoid"                  # stbp: surrogate gradient 'sigmoid' | 'atan'
  surrogate_alpha: float = 4.0                # stbp: surrogate sharpness

  def validate(self) -> "ArchConfig":
    check_tk(self.T, self.K)
    for name, n in (("widths", 4), ("depths", 4), ("heads", 3), ("gw_strides", 2)):
      if len(getattr(self, name)) != n:
        raise ValueError(f"ArchConfig.{name} needs {n} entries, got {getattr(self, name)!r}.")
    if self.paradigm not in PARADIGMS:
      raise ValueError(f"ArchConfig.paradigm={self.paradigm!r}: use one of {PARADIGMS}.")
    if self.paradigm == "stbp" and (self.lif_reset not in RESETS or self.surrogate not in SURROGATES):
      raise ValueError(f"STBP options lif_reset={self.lif_reset!r}, surrogate={self.surrogate!r}: use one of "
                       f"{RESETS} and one of {SURROGATES}.")
    if self.quantizer not in METHODS:
      raise ValueError(f"ArchConfig.quantizer={self.quantizer!r}: use one of {METHODS}.")
    if self.spike_integration not in INTEGRATIONS:
      raise ValueError(f"ArchConfig.spike_integration={self.spike_integration!r}: use one of {INTEGRATIONS}.")
    if self.dtype not in ("float32", "bfloat16", "float64"):
      raise ValueError(f"ArchConfig.dtype={self.dtype!r}: use 'float32', 'bfloat16' or 'float64'.")
    if self.activation_dtype not in ("same", "float32", "bfloat16", "float64"):
      raise ValueError(f"ArchConfig.activation_dtype={self.activation_dtype!r}: use 'same', 'float32', 'bfloat16' "
                       f"or 'float64'.")
    if self.remat not in REMATS:
      raise ValueError(f"ArchConfig.remat={self.remat!r}: use one of {REMATS}.")
    if self.depthwise not in ("auto",) + DEPTHWISE:
      raise ValueError(f"ArchConfig.depthwise={self.depthwise!r}: use 'auto' or one of {DEPTHWISE}.")
    if self.attention_kernel not in ("auto",) + ATTENTION_KERNELS:
      raise ValueError(f"ArchConfig.attention_kernel={self.attention_kernel!r}: use 'auto' or one of "
                       f"{ATTENTION_KERNELS}.")
    if self.conv_kernel_grad not in ("auto",) + KERNEL_GRADS:
      raise ValueError(f"ArchConfig.conv_kernel_grad={self.conv_kernel_grad!r}: use 'auto' or one of {KERNEL_GRADS}.")
    if "float64" in (self.dtype, self.activation_dtype) and not jax.config.jax_enable_x64:
      raise ValueError("ArchConfig.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or run inside "
                       "`with jax.enable_x64(True):`.")
    for size, s, stage in zip(self.stage_sizes()[1:3], self.gw_strides, (2, 3)):
      try:
        check_divisible(size, size, s)
      except ValueError as e:
        raise ValueError(f"Stage {stage} ({size}x{size} tokens at image_size={self.image_size}): {e}") from None
    return self

  def stage_sizes(self) -> tuple:
    """Token-map side of stages 1..4 for a square `image_size` input."""
    size = -(-self.image_size // self.stem_stride)
    size = -(-size // self.stage1_stride)
    out = [size]
    for _ in range(3):
      size = -(-size // 2)
      out.append(size)
    return tuple(out)

  @property
  def neuron(self) -> dict:
    lif = dict(tau=self.lif_tau, threshold=self.lif_threshold, reset=self.lif_reset, surrogate=self.surrogate,
               surrogate_alpha=self.surrogate_alpha)
    return dict(T=self.T, K=self.K, lam_init=self.lam_init, method=self.quantizer, emitter=self.emitter,
                integration=self.spike_integration, paradigm=self.paradigm, lif=lif)

  @property
  def compute(self) -> Compute:
    """How the synaptic layers compute (blocks.Compute), with 'same' and 'auto' resolved."""
    backend = jax.default_backend()
    cpu = backend == "cpu"
    depthwise = ("shifts" if cpu else "conv") if self.depthwise == "auto" else self.depthwise
    kernel_grad = ("taps" if cpu else "conv") if self.conv_kernel_grad == "auto" else self.conv_kernel_grad
    attention = ("pallas" if backend == "tpu" else "xla") if self.attention_kernel == "auto" else self.attention_kernel
    act = self.dtype if self.activation_dtype == "same" else self.activation_dtype
    return Compute(jnp.dtype(self.dtype), jnp.dtype(act), depthwise, kernel_grad, attention)

  @property
  def train_mode(self) -> str:
    """The mode the network trains in: 'quantize' (ExpG-IF) or 'stbp' (LIF over T steps)."""
    return "stbp" if self.paradigm == "stbp" else "quantize"

  @property
  def eval_modes(self) -> tuple:
    """Modes that evaluate a trained network: both ExpG-IF modes, or the STBP network itself."""
    return ("stbp",) if self.paradigm == "stbp" else ("quantize", "spike")


def _family_entry(w: int, **kw) -> dict:
  return dict(stem_width=w // 2 + w // 6, widths=(w, 2 * w, 4 * w, 8 * w), **kw)


# The paper's sizes share depths; base widths follow the 3:4:5 reading (SPEC §3).
# depths (1, 3, 4, 1) with Stage 1 expanding 4x lands all three within 0.6 % of Table 3.
_IMAGENET = dict(depths=(1, 3, 4, 1), stage1_expand=4, gw_strides=(4, 2), stem_kernel=7, stem_stride=2,
                 stage1_stride=2, image_size=224)
_CIFAR = dict(gw_strides=(2, 2), stem_kernel=3, stem_stride=1, stage1_stride=1, image_size=32)
FAMILY: dict[str, dict] = {
    "ge2mst_small": _family_entry(48, heads=(2, 3, 6), **_IMAGENET),
    "ge2mst_base": _family_entry(64, heads=(2, 4, 8), **_IMAGENET),
    "ge2mst_large": _family_entry(80, heads=(2, 5, 10), **_IMAGENET),
    "ge2mst_small_cifar": _family_entry(48, heads=(2, 3, 6), depths=(1, 3, 4, 1), stage1_expand=4, **_CIFAR),
    "ge2mst_base_cifar": _family_entry(64, heads=(2, 4, 8), depths=(1, 3, 4, 1), stage1_expand=4, **_CIFAR),
    "ge2mst_large_cifar": _family_entry(80, heads=(2, 5, 10), depths=(1, 3, 4, 1), stage1_expand=4, **_CIFAR),
    # Trains to >95 % on the built-in digits in minutes on a 2-core CPU.
    "ge2mst_tiny": dict(stem_width=16, widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), heads=(1, 2, 2),
                        stage1_expand=1, **_CIFAR),
}


class Ge2msT(nnx.Module):
  """The Ge2mS-T network. Call as `model(images, mode='quantize'|'spike', alpha=1.0)`."""

  def __init__(self, cfg: ArchConfig, num_classes: int = 1000, *, rngs: nnx.Rngs):
    cfg = cfg.validate()
    self.cfg, self.num_classes = cfg, num_classes
    nr, comp = cfg.neuron, cfg.compute
    c0, (c1, c2, c3, c4) = cfg.stem_width, cfg.widths
    self.adapter = (EventFrameAdapter(cfg.event_frames, out_channels=cfg.in_channels, compute=comp, rngs=rngs)
                    if cfg.event_frames else None)
    self.stem = Stem(cfg.in_channels, c0, cfg.stem_kernel, cfg.stem_stride, compute=comp, rngs=rngs)
    mid = c1 * cfg.stage1_expand
    stage1 = [SConv(c0, mid, 3, cfg.stage1_stride, neuron=nr, compute=comp, rngs=rngs),
              SConv(mid, c1, 3, neuron=nr, compute=comp, rngs=rngs)]
    stage1 += [SFFN(c1, cfg.ffn_ratio, depthwise=False, neuron=nr, compute=comp, rngs=rngs)
               for _ in range(cfg.depths[0])]
    stages = [nnx.List(stage1)]
    cin = c1
    for i, (c, d) in enumerate(zip((c2, c3, c4), cfg.depths[1:])):
      last = i == 2
      blocks = [SConv(cin, c, 3, 2, neuron=nr, compute=comp, rngs=rngs)]
      for _ in range(d):
        blocks.append(AttentionBlock(c, cfg.heads[i], None if last else cfg.gw_strides[i], cfg.global_frac,
                                     cfg.attn_scale_log2, "none" if last else cfg.conv_branch, neuron=nr,
                                     compute=comp, rngs=rngs))
        blocks.append(SFFN(c, cfg.ffn_ratio, depthwise=not last, neuron=nr, compute=comp, rngs=rngs))
      stages.append(nnx.List(blocks))
      cin = c
    self.stages = nnx.List(stages)
    self.head_if = make_neuron(**nr)
    # The logits layer computes in float32 whatever the network's dtype (a few thousandths of the
    # FLOPs): its pooled input is off the code grid in quantize mode, and bf16 rounding of it
    # would flip close logits between the two modes.
    wide = jnp.promote_types(comp.dtype, jnp.float32)
    self.classifier = SynapticConv(c4, num_classes, 1, bn=False, bias=True, compute=Compute(wide, wide), rngs=rngs)
    name_layers(self, (SynapticConv, SpikingAttention))

  def check_input(self, images) -> None:
    """One-line errors for images that do not fit this network (raised before any compile)."""
    cfg = self.cfg
    if cfg.event_frames:
      want = f"[B, {cfg.event_frames}, H, W, 2]"
      ok = images.ndim == 5 and images.shape[1] == cfg.event_frames and images.shape[-1] == 2
    else:
      want = f"[B, H, W, {cfg.in_channels}] (NHWC)"
      ok = images.ndim == 4 and images.shape[-1] == cfg.in_channels
    if not ok:
      raise ValueError(f"Images of shape {tuple(images.shape)} do not match the model input {want}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"Images have dtype {images.dtype}; pass floating-point images (normalise uint8 first).")
    H, W = images.shape[-3:-1]
    if (H, W) != (cfg.image_size, cfg.image_size):
      # Another square size works as long as the GW-SSA strides still divide the token maps.
      sizes = dataclasses.replace(cfg, image_size=H).stage_sizes()
      if H != W or any(size % s for size, s in zip(sizes[1:3], cfg.gw_strides)):
        raise ValueError(f"Images are {H}x{W} but the model is built for {cfg.image_size}x{cfg.image_size} "
                         f"(GW-SSA strides {cfg.gw_strides}): resize the images or set image_size.")

  @property
  def training(self) -> bool:
    """BatchNorm on batch statistics: after `model.train()`, and as `create_model` returns it.

    `train()` / `eval()` switch every BatchNorm together, so the first one found (the stem's)
    tells; walking the whole graph cost 12 ms per eager call of ge2mst_small.
    """
    first = next(m for _, m in nnx.iter_graph(self) if isinstance(m, nnx.BatchNorm))
    return not first.use_running_average

  def __call__(self, images, *, mode: str = "quantize", alpha=1.0, collect: bool = False):
    ctx = Forward.of(mode, alpha, collect)   # the one place the pass's properties are decided
    if (mode == "stbp") != (self.cfg.paradigm == "stbp"):
      raise ValueError(f"A {self.cfg.paradigm!r} network runs in mode(s) {self.cfg.eval_modes}, not {mode!r}.")
    if mode == "spike" and self.training:
      raise ValueError("Spike mode is inference (BatchNorm on its running statistics) but the model is "
                       "in training mode, where quantize mode uses batch statistics: call model.eval() first.")
    self.check_input(images)
    x = images.astype(jnp.promote_types(self.cfg.dtype, jnp.float32))
    if self.adapter is not None:
      x = self.adapter(x, ctx)
    x = self.stem(x, ctx)
    if mode == "stbp":  # direct encoding: the stem's output is the input current of every step
      x = jnp.broadcast_to(x, (self.cfg.T, *x.shape))
    for stage in self.stages:
      for block in stage:
        x = call_block(block, x, ctx, remat=self.cfg.remat)
    s = self.head_if(x, ctx)
    if mode == "spike" or (mode == "stbp" and collect):
      # The classifier consumes spikes token by token; pooling is additions. Linear, so training
      # pools first (the same function, fewer operations).
      logits = jnp.mean(self.classifier(s, ctx), axis=(-3, -2))
    else:
      pooled = jnp.mean(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=(-3, -2), keepdims=True)
      logits = self.classifier(pooled, ctx)[..., 0, 0, :]
    return jnp.mean(logits, axis=0) if mode == "stbp" else logits


def call_block(block, x, ctx: Forward, *, remat: str = "none"):
  """One block as the network runs it: rematerialised under `remat='block'` when training (spike
  mode and the instrumented passes keep nothing for a backward pass)."""
  if remat == "block" and ctx.mode != "spike" and not ctx.collect:
    return _remat_call(block, x, ctx)
  return block(x, ctx)


@nnx.remat(policy=remat_policy)
def _remat_call(block, x, ctx):
  return block(x, ctx)   # ctx is a pytree: alpha is traced, the mode and the grid decision static


def arch_config(name: str, **overrides) -> ArchConfig:
  """The ArchConfig of a family member, with field overrides (unknown fields are an error)."""
  if name not in FAMILY:
    raise ValueError(f"Unknown model {name!r}: choose one of {sorted(FAMILY)}.")
  fields = {f.name for f in dataclasses.fields(ArchConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown model option(s) {unknown} for {name}: valid options are {sorted(fields)}.")
  merged = {**FAMILY[name], **overrides}
  merged = {k: tuple(v) if isinstance(v, (list, Sequence)) and not isinstance(v, str) else v
            for k, v in merged.items()}
  return ArchConfig(**merged).validate()


def create_model(name: str, num_classes: int = 1000, rngs: nnx.Rngs | int = 0, **overrides) -> Ge2msT:
  """`create_model('ge2mst_small', num_classes=1000, rngs=nnx.Rngs(0), T=4, K=2)`.

  `rngs` initialises the weights: an `nnx.Rngs`, or an int seed. The default is seed 0, so
  two calls without `rngs` build identical networks; pass a seed to get another draw.
  The network is in training mode (BatchNorm on batch statistics): `model.eval()` before
  inference, which spike mode requires.
  """
  return Ge2msT(arch_config(name, **overrides), num_classes, rngs=_as_rngs(rngs))


def arch_from_config(cfg) -> ArchConfig:
  """The ArchConfig a training config (`cfg.model.arch`, configs/*.py) describes."""
  arch = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.model.arch.items()}
  return ArchConfig(**arch).validate()


def model_from_config(cfg, rngs: nnx.Rngs | int | None = None) -> Ge2msT:
  """The network a training config describes, initialised from `rngs` (default: `cfg.seed`)."""
  return Ge2msT(arch_from_config(cfg), cfg.data.num_classes, rngs=_as_rngs(cfg.seed if rngs is None else rngs))


def _as_rngs(rngs: nnx.Rngs | int) -> nnx.Rngs:
  return rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(int(rngs))


def count_params(model_or_state) -> int:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return int(sum(x.size for x in jax.tree.leaves(state)))


def abstract_param_count(name: str, num_classes: int = 1000, **overrides) -> int:
  """Parameter count without allocating weights (`nnx.eval_shape`)."""
  abstract = nnx.eval_shape(lambda: create_model(name, num_classes, nnx.Rngs(0), **overrides))
  return count_params(abstract)
