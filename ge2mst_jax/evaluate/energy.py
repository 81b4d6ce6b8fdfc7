"""Synaptic operations, firing rates, MACs and energy (docs/math.md#energy).

SOPs are counted exactly from the spikes of an instrumented spike-mode pass: every
synaptic layer (conv, linear, spike matmul) sows the accumulates its non-zero inputs
trigger over all T steps. The stem (real-valued input) is excluded and reported as
MACs. `Energy = 0.9 pJ x SOPs`; a MAC costs 4.6 pJ (45 nm, Horowitz 2014).
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ge2mst_jax.evaluate import hardware
from ge2mst_jax.io import saved_config
from ge2mst_jax.nn.attention import SpikingAttention
from ge2mst_jax.nn.blocks import SynapticConv
from ge2mst_jax.spiking.neurons import ExpGIF, expg_levels
from ge2mst_jax.spiking.spike_stats import SpikeStats

E_AC_PJ = 0.9   # one accumulate (SOP)
E_MAC_PJ = 4.6  # one multiply-accumulate
REAL_INPUT_LAYERS = ("stem", "adapter")


def capture_stats(fn, module, *args, **kwargs):
  """Runs `fn(module, *args, **kwargs)`; returns its output and `{path: total}` of sown SpikeStats."""
  out, stats = nnx.capture(fn, SpikeStats)(module, *args, **kwargs)
  flat = {tuple(str(p) for p in path): sum(v.get_value()) for path, v in nnx.to_flat_state(stats)}
  return out, flat


@nnx.jit(static_argnames=("mode",))
def instrumented_forward(model, images, mode: str = "spike"):
  """Logits and the flat `{path: value}` statistics sown by every layer during one pass."""
  return capture_stats(lambda m, x: m(x, mode=mode, collect=True), model, images)


def _unit(path: tuple) -> tuple[str, str, str]:
  """(stage, block, layer) names of a stat path like ('stages','2','1','attn','q','sops')."""
  if path[0] == "stages":
    return f"stage{int(path[1]) + 1}", f"stage{int(path[1]) + 1}.block{path[2]}", ".".join(path[:-1])
  if path[0] in REAL_INPUT_LAYERS:
    return "stem", path[0], ".".join(path[:-1])
  return "head", "head", ".".join(path[:-1])


def summarize(flat_spike: dict, flat_quant: dict | None, batch: int, T: int) -> dict[str, Any]:
  """Per-image SOPs (per layer/block/stage), firing rates, MACs and energy from sown stats."""
  sops = collections.defaultdict(float)
  per_block, per_stage = collections.defaultdict(float), collections.defaultdict(float)
  rates, spikes_per_neuron = {}, {}
  for path, v in flat_spike.items():
    v = float(v)
    stage, block, layer = _unit(path)
    kind = path[-1]
    if kind.endswith("sops"):
      name = layer if kind == "sops" else f"{layer}.{kind[:-5]}"
      sops[name] += v / batch
      per_block[block] += v / batch
      per_stage[stage] += v / batch
    elif kind == "spike_count":
      neurons = float(flat_spike[path[:-1] + ("neurons",)])
      rates[layer] = v / (neurons * T)
      spikes_per_neuron[layer] = v / neurons
  macs = collections.defaultdict(float)
  for path, v in (flat_quant or flat_spike).items():
    if path[-1].endswith("macs"):
      stage, _, layer = _unit(path)
      macs["stem" if stage == "stem" else "network"] += float(v)
  total = float(sum(sops.values()))
  return {
      "sops_per_image": total,
      "sops_per_stage": dict(per_stage),
      "sops_per_block": dict(per_block),
      "sops_per_layer": dict(sops),
      "energy_mj_per_image": total * E_AC_PJ * 1e-9,
      "firing_rates": rates,
      "spikes_per_neuron": spikes_per_neuron,
      "mean_firing_rate": float(np.mean(list(rates.values()))) if rates else 0.0,
      "stem_macs_per_image": macs["stem"],
      "stem_energy_mj_per_image": macs["stem"] * E_MAC_PJ * 1e-9,
      "network_macs_per_image": macs["network"],
      "macs_per_image": macs["stem"] + macs["network"],
      "flops_per_image": 2 * (macs["stem"] + macs["network"]),
      "ann_energy_mj_per_image": (macs["stem"] + macs["network"]) * E_MAC_PJ * 1e-9,
  }


def _in_eval_mode(model):
  """The model with BatchNorm on its running statistics, leaving the caller's as it was: a new
  graph over the same arrays (nothing is copied)."""
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  return copy


def energy_report(model, images, table=None) -> dict[str, Any]:
  """Exact SOP / firing-rate / energy report of `model` on `images` (BN in eval mode; the
  caller's model is left in its mode). `hardware_energy`: the three energy models
  (`hardware.apply`) priced with `table` (the config's `energy`; default: the default table)."""
  model = _in_eval_mode(model)
  if model.cfg.paradigm == "stbp":  # the STBP network is its own spiking network
    _, flat = instrumented_forward(model, images, mode="stbp")
    return {**summarize(jax.device_get(flat), None, images.shape[0], model.cfg.T), "hardware_energy": None}
  _, flat = instrumented_forward(model, images, mode="spike")
  flat, dense = jax.device_get(flat), _dense_macs(model, images.shape[1:])
  rep = summarize(flat, dense, images.shape[0], model.cfg.T)
  counts = layer_counts(model, flat, dense, images.shape[0], images.shape[1:])
  rep["hardware_energy"] = {"counts": counts,
                            **hardware.apply(counts, saved_config.defaults().energy if table is None else table)}
  return rep


def _stats_by_layer(flat: dict) -> dict[str, dict[str, float]]:
  """`{layer: {stat: value}}` of flat sown stats; an attention product is its own layer
  ('...attn.qk': the stats its owner sowed as 'qk_*')."""
  out = collections.defaultdict(dict)
  for path, v in flat.items():
    layer, stat = ".".join(path[:-1]), path[-1]
    for product in ("qk", "av"):
      if stat.startswith(product + "_"):
        layer, stat = f"{layer}.{product}", stat[len(product) + 1:]
    out[layer][stat] = float(v)
  return out


def conv_counts(conv: SynapticConv, spike: dict, dense: dict, batch: int, T: int, pre: ExpGIF) -> dict:
  """A synaptic layer's counts per image: `spike`/`dense` are its stats of a spike-mode pass over
  `batch` images and of the quantize-mode network on one (`_stats_by_layer`); `pre` its presynaptic neuron."""
  k, _, cin_g, _ = conv.kernel.shape
  fan_in = k * k * cin_g
  outputs, ann_outputs = spike["macs"] / fan_in, dense["macs"] / fan_in
  inputs = spike["inputs"] / batch
  return {"kind": "conv", "T": T, "sops": spike["sops"] / batch, "in_spikes": spike["in_spikes"] / batch,
          "inputs": inputs, "outputs": outputs, "macs": dense["macs"], "ann_outputs": ann_outputs,
          # the quantized ANN reads what it computes on: the classifier's pooled tokens, not every token
          "ann_inputs": inputs * ann_outputs / outputs, "weights": float(np.prod(conv.kernel.shape)),
          "in_signed": bool(pre.symmetric), "in_bits": _activation_bits(pre)}


def product_counts(spike: dict, dense: dict, batch: int, T: int, a: ExpGIF, b: ExpGIF, scores: bool) -> dict:
  """An attention product's counts per image (`conv_counts`' arguments); `a`, `b`: the neurons
  that emit its operands; `scores`: its outputs are the score map (Q K^T)."""
  out = {"kind": "product", "T": T, "scores": scores, "sops": spike["sops"] / batch,
         "outputs": spike["outputs"] / batch, "macs": dense["macs"], "ann_outputs": dense["outputs"]}
  for o, n in (("a", a), ("b", b)):
    out.update({f"{o}_inputs": spike[f"{o}_inputs"] / batch, f"{o}_spikes": spike[f"{o}_in_spikes"] / batch,
                f"{o}_signed": bool(n.symmetric), f"{o}_bits": _activation_bits(n)})
  return out


def neuron_counts(neuron: ExpGIF, spike: dict, batch: int) -> dict:
  """An ExpG-IF layer's counts per image."""
  return {"kind": "neuron", "T": neuron.T, "neurons": spike["neurons"] / batch, "spikes": spike["spike_count"] / batch,
          "levels": len(expg_levels(neuron.T, neuron.K).codes), "symmetric": bool(neuron.symmetric)}


def _activation_bits(neuron: ExpGIF) -> int:
  return hardware.activation_bits(len(expg_levels(neuron.T, neuron.K).codes), neuron.symmetric)


def layer_counts(model, flat_spike: dict, flat_dense: dict, batch: int, image_shape) -> dict[str, dict]:
  """Per image and layer, in network order, every count the hardware energy models price
  (`hardware.terms`): from one spike-mode pass (`flat_spike`, batch totals but MACs) and the
  quantize-mode network's shapes (`flat_dense`, `_dense_macs`). An ExpG-IF network's."""
  spike, dense = _stats_by_layer(flat_spike), _stats_by_layer(flat_dense)
  T = model.cfg.T
  modules = {".".join(map(str, p)): m for p, m in nnx.iter_graph(model)}
  counts, pixels = {}, float(np.prod(image_shape))
  for name, m in modules.items():
    if not isinstance(m, (ExpGIF, SpikingAttention, SynapticConv)):
      continue
    where = dict(zip(("stage", "block"), _unit(tuple(name.split(".")) + ("",))[:2]))
    if isinstance(m, ExpGIF) and name in spike:
      counts[name] = {**neuron_counts(m, spike[name], batch), **where}
    elif isinstance(m, SpikingAttention):
      # The operands' neurons: Q K^T of two symmetric trains, A V of the attention's (binary) and V's.
      for prod, (a, b) in (("qk", (m.q_if, m.k_if)), ("av", (m.attn_if, m.v_if))):
        p = f"{name}.{prod}"
        counts[p] = {**product_counts(spike[p], dense[p], batch, T, a, b, prod == "qk"), **where}
    elif isinstance(m, SynapticConv) and name in dense:
      if name.split(".")[0] in REAL_INPUT_LAYERS:
        k, _, cin_g, _ = m.kernel.shape
        outputs = dense[name]["macs"] / (k * k * cin_g)
        counts[name] = {"kind": "input", **where, "macs": dense[name]["macs"], "outputs": outputs,
                        "weights": float(np.prod(m.kernel.shape)), "inputs": pixels}
        pixels = outputs   # an adapter's output is the stem's input
        continue
      # The presynaptic neuron: an attention's projection reads its symmetric output neuron; every
      # other layer a block's or an SConv's (binary) neuron, all of the network's T and K.
      pre = modules[name.rpartition(".")[0]].out_if if name.endswith("attn.proj") else model.head_if
      counts[name] = {**conv_counts(m, spike[name], dense[name], batch, T, pre), **where}
  return dict(sorted(counts.items(), key=lambda kv: _network_order(kv[0])))


def _network_order(name: str) -> tuple:
  """A layer's place: input layers, the stages and blocks in order, the head (graph traversal
  sorts names alphabetically)."""
  parts = name.split(".")
  rank = {"adapter": 0, "stem": 1, "stages": 2, "head_if": 3}.get(parts[0], 4)
  return (rank, *((int(p), "") if p.isdigit() else (-1, p) for p in parts[1:]))


def _dense_macs(model, image_shape) -> dict:
  """`{path: MACs}` of every layer of one image's quantize-mode forward (the ANN the network is).

  Spike mode counts otherwise where it computes otherwise (its classifier runs on every token
  before pooling). The counts depend on shapes alone: the forward is traced, and the compiled
  program returns only constants, so XLA drops the network itself and nothing is computed. For
  the same reason an abstract model (`nnx.eval_shape(lambda: create_model(...))`) serves as well
  as one with weights: the forward is traced on zeros of the state's shapes.
  """
  graphdef, state = nnx.split(_in_eval_mode(model))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  mode = model.cfg.train_mode

  @jax.jit
  def counts():
    m = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    _, flat = capture_stats(lambda m, x: m(x, mode=mode, collect=True), m, jnp.zeros((1, *image_shape), jnp.float32))
    return {path: v for path, v in flat.items() if path[-1].endswith(("macs", "outputs"))}

  return jax.device_get(counts())


def model_macs(model, image_shape) -> dict[str, float]:
  """Dense MACs and FLOPs per image (stem and network) of a quantize-mode forward."""
  out = summarize({}, _dense_macs(model, image_shape), 1, model.cfg.T)
  return {k: out[k] for k in ("stem_macs_per_image", "network_macs_per_image", "macs_per_image", "flops_per_image")}


def format_report(rep: dict[str, Any], top: int = 12) -> str:
  """A short human-readable rendering of `energy_report`'s output."""
  lines = [f"SOPs / image: {rep['sops_per_image'] / 1e6:,.3f} M   energy: {rep['energy_mj_per_image']:.4f} mJ "
           f"(0.9 pJ/SOP)   stem: {rep['stem_macs_per_image'] / 1e6:,.3f} M MACs = "
           f"{rep['stem_energy_mj_per_image']:.4f} mJ (4.6 pJ/MAC)",
           f"dense MACs / image (ANN equivalent): {rep['macs_per_image'] / 1e6:,.3f} M   "
           f"mean firing rate {rep['mean_firing_rate']:.4f}",
           "SOPs per stage (M): " + "  ".join(f"{k}={v / 1e6:,.3f}" for k, v in sorted(rep["sops_per_stage"].items()))]
  layers = sorted(rep["sops_per_layer"].items(), key=lambda kv: -kv[1])[:top]
  lines += [f"  {name:45s} {v / 1e6:10.4f} M SOPs" for name, v in layers]
  return "\n".join(lines)
