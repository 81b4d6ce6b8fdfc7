"""The staged Ge2mS-T network and its model family (docs/math.md#network).

    stem (real conv) -> Stage 1: SConv up, SConv down, SFFN
                     -> Stage 2: SConv stride 2, [GW-SSA(s2) + Conv-SFFN] x d2
                     -> Stage 3: SConv stride 2, [GW-SSA(s3) + Conv-SFFN] x d3
                     -> Stage 4: SConv stride 2, [SSA + SFFN] x d4
                     -> ExpG-IF -> global average pool -> linear classifier

`model(images, mode='quantize' | 'spike')` computes the same function in both modes:
quantizers during training, T-step spike trains at inference.

As a backbone: `logits, out = model.features(images, mode)` (big_vision's convention) gives each
stage's NHWC map and the pooled `pre_logits`; `num_classes=0` builds the network without a
classifier (calls return the embedding) and `features_only=True` one whose calls return the
list of stage maps (timm's names; `model.feature_info` lists their channels and strides).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from ge2mst_jax.nn.attention import AttentionBlock, SpikingAttention, check_divisible
from ge2mst_jax.nn.blocks import (SFFN, Compute, EventFrameAdapter, Numerics, SConv, Stem, SynapticConv, make_neuron,
                               name_layers, remat_policy)
from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.neurons import Neuron, SpikeTrain
from ge2mst_jax.spiking.stbp import Baseline


@dataclasses.dataclass(frozen=True)
class Shape:
  """The network's shape. Fields marked (reading) are choices the paper leaves open
  (docs/math.md#readings-and-the-fields-that-select-them)."""
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

  def __post_init__(self):
    for name, n in (("widths", 4), ("depths", 4), ("heads", 3), ("gw_strides", 2)):
      if len(getattr(self, name)) != n:
        raise ValueError(f"{name} needs {n} entries, got {getattr(self, name)!r}.")
    for size, s, stage in zip(self.stage_sizes()[1:3], self.gw_strides, (2, 3)):
      try:
        check_divisible(size, size, s)
      except ValueError as e:
        raise ValueError(f"Stage {stage} ({size}x{size} tokens at image_size={self.image_size}): {e}") from None

  def stage_sizes(self, image_size: int | None = None) -> tuple:
    """Token-map side of stages 1..4 for a square input of `image_size` (default: the network's)."""
    size = -(-(image_size or self.image_size) // self.stem_stride)
    size = -(-size // self.stage1_stride)
    out = [size]
    for _ in range(3):
      size = -(-size // 2)
      out.append(size)
    return tuple(out)


# The groups of an ArchConfig. Field names are unique across them: one flat name -> group map
# serves config files (`config.model.arch.<field>`), `create_model(**overrides)` and flat reads.
GROUPS = {"shape": Shape, "neuron": Neuron, "numerics": Numerics, "baseline": Baseline}
FIELDS = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """Everything that shapes a Ge2mS-T network, as four small configs that each check themselves
  when built: the network's `shape`, its ExpG-IF `neuron`s, the `numerics` (dtypes, kernel
  backends, remat) and the training paradigm with the LIF `baseline`.

  Flat everywhere users see it: `ArchConfig.from_flat(T=8, dtype='bfloat16')`, `cfg.flat()` (what
  config files hold), `cfg.replace(image_size=64)`, and reads such as `cfg.T` (= `cfg.neuron.T`).
  """
  shape: Shape = dataclasses.field(default_factory=Shape)
  neuron: Neuron = dataclasses.field(default_factory=Neuron)
  numerics: Numerics = dataclasses.field(default_factory=Numerics)
  baseline: Baseline = dataclasses.field(default_factory=Baseline)

  @classmethod
  def from_flat(cls, **fields) -> "ArchConfig":
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
      raise ValueError(f"Unknown model option(s) {unknown}: valid options are {sorted(FIELDS)}.")
    fields = {k: tuple(v) if isinstance(v, (list, Sequence)) and not isinstance(v, str) else v
              for k, v in fields.items()}
    return cls(**{group: kind(**{k: v for k, v in fields.items() if FIELDS[k] == group})
                  for group, kind in GROUPS.items()})

  def flat(self) -> dict:
    """`{field: value}` over every group: what `config.model.arch` holds."""
    return {name: getattr(getattr(self, group), name) for name, group in FIELDS.items()}

  def replace(self, **fields) -> "ArchConfig":
    return ArchConfig.from_flat(**{**self.flat(), **fields})

  def __getattr__(self, name):
    # Only called when normal lookup fails: a flat field name reads from its group.
    group = FIELDS.get(name)
    if group is None:
      raise AttributeError(f"'ArchConfig' object has no attribute {name!r}")
    return getattr(object.__getattribute__(self, group), name)

  def stage_sizes(self) -> tuple:
    return self.shape.stage_sizes()

  @property
  def neuron_args(self) -> dict:
    """The `blocks.make_neuron` arguments of the network's neurons."""
    nr, b = self.neuron, self.baseline
    lif = dict(tau=b.lif_tau, threshold=b.lif_threshold, reset=b.lif_reset, surrogate=b.surrogate,
               surrogate_alpha=b.surrogate_alpha)
    return dict(T=nr.T, K=nr.K, lam_init=nr.lam_init, method=nr.quantizer, emitter=nr.emitter,
                integration=nr.spike_integration, paradigm=b.paradigm, lif=lif)

  @property
  def compute(self) -> Compute:
    """How the synaptic layers compute (blocks.Compute), with 'same' and 'auto' resolved."""
    return self.numerics.compute()

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


# The paper's sizes share depths; base widths follow the 3:4:5 reading (docs/math.md#architecture-tables).
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
  """The Ge2mS-T network. Call as `model(images, mode='quantize'|'spike', alpha=1.0)`.

  `num_classes=0`: no classifier; calls return the pooled embedding `[B, C4]`.
  `features_only=True`: no classifier; calls return the four stage maps (`features`).
  """

  def __init__(self, cfg: ArchConfig, num_classes: int = 1000, *, features_only: bool = False, rngs: nnx.Rngs):
    if num_classes < 0:
      raise ValueError(f"num_classes={num_classes}: pass the number of classes, or 0 for a network without a classifier.")
    self.cfg, self.features_only = cfg, features_only
    self.num_classes = 0 if features_only else num_classes
    nr, comp = cfg.neuron_args, cfg.compute
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
    self.classifier = (SynapticConv(c4, self.num_classes, 1, bn=False, bias=True, compute=Compute(wide, wide), rngs=rngs)
                       if self.num_classes else None)
    name_layers(self, (SynapticConv, SpikingAttention))

  @property
  def feature_info(self) -> list[dict]:
    """The maps `features` returns, as timm lists them: name, channels, stride to the input."""
    stride = self.cfg.stem_stride * self.cfg.stage1_stride
    return [{"module": f"stage{i + 1}", "num_chs": c, "reduction": stride * 2 ** i} for i, c in enumerate(self.cfg.widths)]

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
      sizes = cfg.shape.stage_sizes(H)
      if H != W or any(size % s for size, s in zip(sizes[1:3], cfg.gw_strides)):
        raise ValueError(f"Images are {H}x{W} but the model is built for {cfg.image_size}x{cfg.image_size} "
                         f"(GW-SSA strides {cfg.gw_strides}): resize the images or set image_size.")

  @property
  def training(self) -> bool:
    """BatchNorm on batch statistics: after `model.train()`, and as `create_model` returns it.

    `train()` / `eval()` switch every BatchNorm together, so the first one found (the stem's)
    tells, without walking the whole graph on every call.
    """
    first = next(m for _, m in nnx.iter_graph(self) if isinstance(m, nnx.BatchNorm))
    return not first.use_running_average

  def __call__(self, images, *, mode: str = "quantize", alpha=1.0, collect: bool = False):
    """Logits `[B, num_classes]`; the embedding `[B, C4]` without a classifier; the stage maps
    with `features_only`."""
    if self.features_only:
      _, out = self.features(images, mode=mode, alpha=alpha)
      return [out[f["module"]] for f in self.feature_info]
    y, _ = self._forward(images, mode, alpha, collect, features=False)
    return y

  def features(self, images, *, mode: str = "quantize", alpha=1.0) -> tuple[jax.Array, dict]:
    """`(logits, out)`: the network as a backbone (big_vision's convention).

    - `out["stage1"]` .. `out["stage4"]`: each stage's output `[B, H_i, W_i, C_i]` (NHWC, strides in
      `feature_info`) as the network transmits it: the ExpG-IF layer reading it (the next stage's
      first, or the head's), decoded. Quantize mode: the quantizer's value; spike mode: the spike
      train's `decode()`, the same values (float32 rounding aside, bitwise on the code grid).
    - `out["pre_logits"]`: `[B, C4]`, stage 4's map averaged over tokens (the embedding).
    - `out["logits"]`: `[B, num_classes]`, when the network has a classifier.
    - `out["spikes"]` (spike mode): `{"stage1": SpikeTrain, ...}` with `.spikes` `[T, B, H_i, W_i, C_i]`
      in {0, 1} and `.scale` (step t weighs `scale * 2^(T-t)`).

    The first value is the logits, or the embedding without a classifier.
    """
    if mode not in ("quantize", "spike"):
      raise ValueError(f"features() runs in mode 'quantize' or 'spike', not {mode!r} (ExpG-IF networks).")
    return self._forward(images, mode, alpha, False, features=True)

  def forward_features(self, images, *, mode: str = "quantize", alpha=1.0) -> jax.Array:
    """Stage 4's map `[B, H_4, W_4, C4]` before pooling (timm's name; `features()` has them all)."""
    return self.features(images, mode=mode, alpha=alpha)[1]["stage4"]

  def _forward(self, images, mode, alpha, collect, features: bool):
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
    trains = {}
    for i, stage in enumerate(self.stages):
      for block in stage:
        x = call_block(block, x, ctx, remat=self.cfg.remat)
      if features and i < 3:   # the spikes stage i+2's down-sampling SConv computes from this map
        trains[f"stage{i + 1}"] = self.stages[i + 1][0].neuron(x, ctx)
    s = self.head_if(x, ctx)
    out = {}
    if features:
      trains["stage4"] = s
      out = {k: t.decode() if mode == "spike" else t for k, t in trains.items()}
      if mode == "spike":
        out["spikes"] = trains
    if features or self.classifier is None:
      v = s.decode() if isinstance(s, SpikeTrain) else s
      out["pre_logits"] = jnp.mean(v.astype(jnp.promote_types(v.dtype, jnp.float32)), axis=(-3, -2))
    if self.classifier is None:
      y = out["pre_logits"]
      return (jnp.mean(y, axis=0) if mode == "stbp" else y), out   # stbp: the T steps' mean, as its logits
    if mode == "spike" or (mode == "stbp" and collect):
      # The classifier consumes spikes token by token; pooling is additions. Linear, so training
      # pools first (the same function, fewer operations).
      logits = jnp.mean(self.classifier(s, ctx), axis=(-3, -2))
    else:
      pooled = jnp.mean(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=(-3, -2), keepdims=True)
      logits = self.classifier(pooled, ctx)[..., 0, 0, :]
    logits = jnp.mean(logits, axis=0) if mode == "stbp" else logits
    if features:
      out["logits"] = logits
    return logits, out


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
  """The ArchConfig of a family member, with flat field overrides (unknown fields are an error)."""
  if name not in FAMILY:
    raise ValueError(f"Unknown model {name!r}: choose one of {sorted(FAMILY)}.")
  return ArchConfig.from_flat(**{**FAMILY[name], **overrides})   # which names unknown options


def create_model(name: str, num_classes: int = 1000, rngs: nnx.Rngs | int = 0, *, features_only: bool = False,
                 **overrides) -> Ge2msT:
  """`create_model('ge2mst_small', num_classes=1000, rngs=nnx.Rngs(0), T=4, K=2)`.

  `num_classes=0` builds the network without a classifier (it returns the pooled embedding);
  `features_only=True` one that returns the four stage maps (see `Ge2msT.features`).

  `rngs` initialises the weights: an `nnx.Rngs`, or an int seed. The default is seed 0, so
  two calls without `rngs` build identical networks; pass a seed to get another draw.
  The network is in training mode (BatchNorm on batch statistics): `model.eval()` before
  inference, which spike mode requires.
  """
  return Ge2msT(arch_config(name, **overrides), num_classes, features_only=features_only, rngs=_as_rngs(rngs))


def arch_from_config(cfg) -> ArchConfig:
  """The ArchConfig a training config (`cfg.model.arch` of a `configs/*.py` file) describes."""
  return ArchConfig.from_flat(**cfg.model.arch)


def model_from_config(cfg, rngs: nnx.Rngs | int | None = None) -> Ge2msT:
  """The network a training config describes, initialised from `rngs` (default: `cfg.seed`)."""
  return Ge2msT(arch_from_config(cfg), cfg.data.num_classes, rngs=_as_rngs(cfg.seed if rngs is None else rngs))


def legacy_path(path: tuple) -> tuple:
  """Where a value saved before attention blocks owned their input neuron lives now: `...attn.q.
  neuron.*` -> `...neuron.*` (the block's) and `...attn.q.conv.*` -> `...attn.q.*`; any other path,
  and every path of this network, is returned as it is. Works inside optimizer states too."""
  for i in range(len(path) - 2):
    if path[i:i + 2] == ("attn", "q") and path[i + 2] in ("neuron", "conv"):
      return path[:i] + ("neuron",) + path[i + 3:] if path[i + 2] == "neuron" else path[:i + 2] + path[i + 3:]
  return path


def upgrade_legacy_tree(pure: dict) -> dict:
  """A nested (pure) state dict with `legacy_path` applied to every leaf's path: what a checkpoint
  written with the old attention layout needs before it is restored into this network."""
  flat = traverse_util.flatten_dict(pure)
  return traverse_util.unflatten_dict({legacy_path(k): v for k, v in flat.items()})


def _as_rngs(rngs: nnx.Rngs | int) -> nnx.Rngs:
  return rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(int(rngs))


def count_params(model_or_state) -> int:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return int(sum(x.size for x in jax.tree.leaves(state)))


def abstract_param_count(name: str, num_classes: int = 1000, **overrides) -> int:
  """Parameter count without allocating weights (`nnx.eval_shape`)."""
  abstract = nnx.eval_shape(lambda: create_model(name, num_classes, nnx.Rngs(0), **overrides))
  return count_params(abstract)
