"""Energy a hardware engineer can check: three models over one set of exact counts (docs/energy.md).

`energy.layer_counts` takes, layer by layer, what one spike-mode pass over real images did
(synaptic accumulates from the spikes, spikes in and out, neurons, partial-sum outputs) and the
shapes of the quantize-mode network (MACs, weights). From those counts alone:

- `paper`: arithmetic only, the paper's convention (0.9 pJ per SOP; the real-valued input layers'
  MACs at 4.6 pJ), its figures unchanged;
- `snn`: the spiking execution on a digital chip: integer accumulates, the step integration, the
  ExpG-IF neurons' updates (level search, then a compare and a soft reset per step), and memory
  traffic per level: weights (DRAM once per image, then SRAM with or without reuse), partial sums
  and membranes, spikes (bitmap or address events), attention score buffers;
- `qann`: the same network run once as a quantized ANN at the neurons' bit width (ceil(log2 of
  the level count)), integer MACs, the same memory model.

Every energy is `count x constant`: the counts (in report.json) and the constants (the config's
`energy` table, `io/energy_table.py`) are apart, and `apply` re-prices saved counts with other
constants without running the network.
"""
from __future__ import annotations

import collections
import math
from typing import Any, NamedTuple

MODELS = ("paper", "snn", "qann")
TITLES = {"paper": "paper (arithmetic, 0.9 pJ/SOP)", "snn": "spiking, hardware model",
          "qann": "quantized ANN, hardware model"}
ARITHMETIC, NEURON = "arithmetic", "neuron updates"
CHEAPER = {"snn": "spiking", "qann": "quantized ANN", "same": "neither (equal)"}


class Term(NamedTuple):
  """One priced quantity: `count` units of `constant` (an op of the table, or a memory level:
  then `count` is 64-bit words)."""
  category: str
  what: str
  count: float
  constant: str


def activation_bits(levels: int, symmetric: bool) -> int:
  """Bits of one quantized activation: ceil(log2) of the neuron's level count (a symmetric
  neuron has the mirrored levels too)."""
  return max(1, math.ceil(math.log2(2 * levels - 1 if symmetric else levels)))


def spike_bits(neurons: float, spikes: float, T: int, signed: bool, encoding: str) -> float:
  """Bits that store or move a spike train of `neurons` neurons over T steps holding `spikes`
  spikes: a bitmap (1 bit a neuron and step, 2 when ternary) or address events (one address of
  ceil(log2 neurons) bits a spike, +1 sign bit when ternary)."""
  if encoding == "bitmap":
    return neurons * T * (2 if signed else 1)
  if encoding == "aer":
    return spikes * (max(1, math.ceil(math.log2(max(neurons, 2)))) + signed)
  raise ValueError(f"energy.spike_encoding={encoding!r}: use 'bitmap' or 'aer'.")


def _mem(what: str, bits: float, level: str) -> Term:
  return Term(f"memory: {level}", what, bits / 64, level)


def terms(unit: dict, model: str, table: dict) -> list[Term]:
  """The priced terms of one layer (`unit`: its counts from `energy.layer_counts`, per image)
  in one execution model."""
  kind, T = unit["kind"], unit.get("T", 1)
  bits, place, reuse = table["bits"], table["placement"], table["reuse"]
  enc = table["spike_encoding"]
  if model == "paper":
    if kind == "input":
      return [Term(ARITHMETIC, "MACs (4.6 pJ)", unit["macs"], "paper_mac")]
    return [Term(ARITHMETIC, "SOPs (0.9 pJ)", unit["sops"], "paper_sop")] if kind != "neuron" else []
  if model not in MODELS:
    raise ValueError(f"Unknown energy model {model!r}: use one of {MODELS}.")
  snn, acc = model == "snn", bits["accumulator"]
  if kind == "neuron":
    n = unit["neurons"]
    search = Term(NEURON, "level search", n * math.ceil(math.log2(unit["levels"])), "compare")
    out_bits = activation_bits(unit["levels"], unit["symmetric"])
    if not snn:   # the quantizer: read the sum, find the level, write the activation
      return [search, _mem("membrane read", n * acc, place["membranes"]),
              _mem("activations written", n * out_bits, place["activations"])]
    # The emitter: a compare against 2^(T-t) every step, a subtraction (soft reset) per spike; the
    # membrane stays in the neuron's register over the T steps, or (no reuse) is read and written back.
    return [search, Term(NEURON, "threshold compare per step", n * T, "compare"),
            Term(NEURON, "soft reset per spike", unit["spikes"], "accumulate"),
            _mem("membrane", n * (1 if reuse else 1 + 2 * T) * acc, place["membranes"]),
            _mem("spikes written", spike_bits(n, unit["spikes"], T, unit["symmetric"], enc), place["activations"])]
  if kind == "input":   # real-valued input (pixels): the same integer MACs in both executions
    return [Term(ARITHMETIC, "multiply", unit["macs"], "multiply"),
            Term(ARITHMETIC, "accumulate", unit["macs"], "accumulate"),
            _mem("weights from DRAM", unit["weights"] * bits["weight"], place["weight_store"]),
            _mem("weights", (unit["weights"] if reuse else unit["macs"]) * bits["weight"], place["weights"]),
            _mem("partial sums", (unit["outputs"] if reuse else 2 * unit["macs"]) * acc, place["membranes"]),
            _mem("pixels read", (unit["inputs"] if reuse else unit["macs"]) * bits["pixel"], place["activations"])]
  product = kind == "product"
  psum_level = place["scores"] if unit.get("scores") else place["membranes"]
  psum_what = "score buffer" if unit.get("scores") else "partial sums"
  if snn:
    ops, outputs = unit["sops"], unit["outputs"]
    # Horner over the steps: a conv's outputs double once a step; a product's pairs of steps, T^2 - 1 times.
    steps = T * T if product else T
    out = [Term(ARITHMETIC, "accumulate (SOPs)", ops, "accumulate"),
           Term(ARITHMETIC, "step integration", outputs * (steps - 1), "accumulate"),
           _mem(psum_what, (outputs if reuse else 2 * ops) * acc, psum_level)]
    if product:   # both operands are spike trains; without reuse, a's steps are read again for every b step
      again = 1 if reuse else T
      read = sum(spike_bits(unit[f"{o}_inputs"], unit[f"{o}_spikes"], T, unit[f"{o}_signed"], enc) for o in "ab")
      return out + [_mem("operand spikes read", read * again, place["activations"])]
    read = spike_bits(unit["inputs"], unit["in_spikes"], T, unit["in_signed"], enc)
  else:
    ops, outputs = unit["macs"], unit["ann_outputs"]
    out = [Term(ARITHMETIC, "multiply", ops, "multiply"), Term(ARITHMETIC, "accumulate", ops, "accumulate"),
           _mem(psum_what, (outputs if reuse else 2 * ops) * acc, psum_level)]
    if product:
      read = (sum(unit[f"{o}_inputs"] * unit[f"{o}_bits"] for o in "ab") if reuse
              else ops * (unit["a_bits"] + unit["b_bits"]))   # without reuse every MAC reads one of each
      return out + [_mem("operands read", read, place["activations"])]
    read = unit["ann_inputs"] * unit["in_bits"] if reuse else ops * unit["in_bits"]
  return out + [_mem("weights from DRAM", unit["weights"] * bits["weight"], place["weight_store"]),
                _mem("weights", (unit["weights"] if reuse else ops) * bits["weight"], place["weights"]),
                _mem("spikes read" if snn else "activations read", read, place["activations"])]


def constant(table: dict, name: str) -> float:
  """pJ of one op, or of one 64-bit access of a memory level."""
  if name in table["ops"]:
    return float(table["ops"][name]["pj"])
  if name in table["memory"]:
    return float(table["memory"][name]["pj_per_64b"])
  raise ValueError(f"The energy table has no constant {name!r}: add it under energy.ops or energy.memory.")


def check_table(table: dict) -> None:
  """One-line errors for a table the model cannot price with."""
  for key, level in table["placement"].items():
    if level not in table["memory"]:
      raise ValueError(f"energy.placement.{key}={level!r} is not a memory level: use one of {sorted(table['memory'])}.")
  spike_bits(1, 0, 1, False, table["spike_encoding"])


def apply(counts: dict[str, dict], table: dict) -> dict[str, Any]:
  """Every model's energy from saved `counts` (report.json's `hardware_energy.counts`) and a
  constants `table` (the config's `energy`, as a dict): per layer and term, per stage and block
  by category, totals, and which execution is cheaper per layer and in total. pJ per image."""
  table = table.to_dict() if hasattr(table, "to_dict") else table
  check_table(table)
  out = {"constants": table, "models": {}}
  for model in MODELS:
    layers, stages, blocks = {}, collections.defaultdict(dict), collections.defaultdict(dict)
    for name, unit in counts.items():
      priced = {}
      for t in terms(unit, model, table):
        pj = t.count * constant(table, t.constant)
        priced[f"{t.category} | {t.what}"] = priced.get(f"{t.category} | {t.what}", 0.0) + pj
        for where, key in ((stages, unit["stage"]), (blocks, unit["block"])):
          where[key][t.category] = where[key].get(t.category, 0.0) + pj
      layers[name] = priced
    total = {}
    for cats in stages.values():
      for cat, pj in cats.items():
        total[cat] = total.get(cat, 0.0) + pj
    out["models"][model] = {"per_layer_pj": layers, "per_stage_pj": dict(stages), "per_block_pj": dict(blocks),
                            "total_pj": total, "total_mj": sum(total.values()) * 1e-9}
  snn, qann = (out["models"][m]["per_layer_pj"] for m in ("snn", "qann"))
  out["cheaper_per_layer"] = {name: _cheaper(sum(snn[name].values()), sum(qann[name].values())) for name in counts}
  out["cheaper"] = _cheaper(out["models"]["snn"]["total_mj"], out["models"]["qann"]["total_mj"])
  return out


def _cheaper(snn: float, qann: float) -> str:
  return "same" if snn == qann else "snn" if snn < qann else "qann"


def term_counts(counts: dict[str, dict], model: str, table: dict) -> dict[str, float]:
  """`{constant: units}` summed over the network: the energy of `model` is their dot product with
  the table's constants (what a user needs to price the network by hand)."""
  out = collections.defaultdict(float)
  for unit in counts.values():
    for t in terms(unit, model, table):
      out[t.constant] += t.count
  return dict(out)


# ----------------------------------------------------------------------------
# Tables and plot for the report
# ----------------------------------------------------------------------------
def categories(result: dict) -> list[str]:
  """Arithmetic, neuron updates, then the memory levels, in the table's order."""
  levels = [f"memory: {k}" for k in result["constants"]["memory"]]
  seen = {c for m in result["models"].values() for c in m["total_pj"]}
  return [c for c in (ARITHMETIC, NEURON, *levels) if c in seen]


def markdown(result: dict, top: int = 0) -> str:
  """The report's energy section: per model and stage by category, totals, the cheaper execution
  per layer, and the constants with their sources."""
  cats = categories(result)
  uj = lambda pj: f"{pj * 1e-6:,.3f}"
  models = result["models"]
  c = result["constants"]
  lines = [f"Energy per image in µJ, three models over the same exact counts (docs/energy.md). Weight reuse: "
           f"{'on' if c['reuse'] else 'off'}; spikes stored as {c['spike_encoding']}; weights "
           f"{c['bits']['weight']} bit, accumulators {c['bits']['accumulator']} bit.", ""]
  for m in MODELS:
    lines += [f"### {TITLES[m]}", "", "| stage | " + " | ".join(cats) + " | total |", "|---" * (len(cats) + 2) + "|"]
    for stage, by_cat in models[m]["per_stage_pj"].items():
      lines.append(f"| {stage} | " + " | ".join(uj(by_cat.get(k, 0.0)) for k in cats) +
                   f" | {uj(sum(by_cat.values()))} |")
    tot = models[m]["total_pj"]
    lines += [f"| **total** | " + " | ".join(uj(tot.get(k, 0.0)) for k in cats) + f" | **{uj(sum(tot.values()))}** |", ""]
  snn, qann = models["snn"]["total_mj"], models["qann"]["total_mj"]
  lines += [f"**Cheaper in total: {CHEAPER[result['cheaper']]}**: spiking {snn * 1e3:,.3f} µJ, quantized ANN {qann * 1e3:,.3f} µJ "
            f"(ratio {snn / qann if qann else float('inf'):.2f}); the paper's convention says "
            f"{models['paper']['total_mj'] * 1e3:,.3f} µJ.", ""]
  n_snn = sum(v == "snn" for v in result["cheaper_per_layer"].values())
  lines += [f"### Per layer: spiking cheaper in {n_snn} of {len(result['cheaper_per_layer'])} layers", "",
            "| layer | paper | spiking | quantized ANN | cheaper |", "|---|---|---|---|---|"]
  per = {m: models[m]["per_layer_pj"] for m in MODELS}
  names = list(result["cheaper_per_layer"])
  if top:
    names = sorted(names, key=lambda n: -max(sum(per["snn"][n].values()), sum(per["qann"][n].values())))[:top]
  lines += [f"| {n} | {uj(sum(per['paper'][n].values()))} | {uj(sum(per['snn'][n].values()))} | "
            f"{uj(sum(per['qann'][n].values()))} | {result['cheaper_per_layer'][n]} |" for n in names]
  lines += ["", "### Constants", "", "| constant | value | source |", "|---|---|---|"]
  lines += [f"| op `{k}` | {v['pj']} pJ | {v['source']} |" for k, v in c["ops"].items()]
  lines += [f"| memory `{k}` | {v['pj_per_64b']} pJ / 64 bit | {v['source']} |" for k, v in c["memory"].items()]
  lines += ["", "Placement: " + ", ".join(f"{k} in `{v}`" for k, v in c["placement"].items()) + "."]
  return "\n".join(lines)


def plot(result: dict, path_png, save) -> str:
  """A stacked bar per stage and model (arithmetic, neuron updates, memory by level); `save(fig,
  path)` writes it (the report's own writer: the directory may be a bucket)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  cats = categories(result)
  stages = list(result["models"]["snn"]["per_stage_pj"])
  fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(stages)), 4.2))
  width, x = 0.27, np.arange(len(stages))
  colors = plt.get_cmap("tab10").colors
  for i, m in enumerate(MODELS):
    bottom = np.zeros(len(stages))
    per = result["models"][m]["per_stage_pj"]
    for j, cat in enumerate(cats):
      vals = np.array([per.get(s, {}).get(cat, 0.0) * 1e-6 for s in stages])
      ax.bar(x + (i - 1) * width, vals, width, bottom=bottom, color=colors[j % 10], edgecolor="white",
             label=cat if i == 0 else None, hatch=("", "//", "..")[i])
      bottom += vals
  ax.set_xticks(x, [f"{s}\npaper | SNN | QANN" for s in stages], fontsize=7)
  ax.set_ylabel("energy / image (µJ)")
  ax.set_title("Energy per stage: paper convention, spiking hardware model, quantized ANN")
  ax.legend(fontsize=7)
  fig.tight_layout()
  out = save(fig, path_png)
  plt.close(fig)
  return out
