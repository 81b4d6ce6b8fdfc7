"""The hardware energy model (evaluate/hardware.py): every term of both executions against counts
computed by hand on tiny layers, the paper's convention unchanged, and linearity in the constants."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ge2mst_jax.evaluate import energy, hardware
from ge2mst_jax.io import energy_table
from ge2mst_jax.nn import attention, blocks, models
from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.neurons import ExpGIF, SpikeTrain

pytestmark = pytest.mark.xdist_group("hardware_energy")

TABLE = energy_table.table().to_dict()
W = 64   # bits per memory word: memory terms count 64-bit words


def _stats(fn, *args):
  _, flat = energy.capture_stats(fn, *args)
  return {k[-1]: float(v) for k, v in flat.items()}


def _priced(unit, model, **table):
  """`{what: count}` of a unit's terms (memory in 64-bit words), under the default table with `table`'s changes."""
  t = {**copy.deepcopy(TABLE), **table}
  out = {}
  for term in hardware.terms(unit, model, t):
    out[term.what] = out.get(term.what, 0.0) + term.count
  return out


def _neuron(T=2, K=2, symmetric=False):
  return ExpGIF(T, K, symmetric)   # T=2, K=2: levels {0, 1, 2, 3}/3


def test_one_by_one_conv_every_term_by_hand():
  conv = blocks.SynapticConv(3, 5, 1, rngs=nnx.Rngs(0))
  conv.eval()
  spikes = np.zeros((2, 1, 2, 3, 3), np.float32)   # T=2, B=1, 2x3 tokens, 3 channels: 18 input neurons
  spikes[0, 0, 0, 0, [0, 2]] = 1
  spikes[1, 0, 1, 1, 1] = 1
  spikes[1, 0, 1, 2, 0] = 1                        # 4 spikes, each reaching the 5 outputs of its token
  spike = _stats(lambda m, x: m(x, Forward.of("spike", collect=True)), conv, SpikeTrain(jnp.asarray(spikes), jnp.float32(0.5)))
  dense = _stats(lambda m, x: m(x, Forward.of(collect=True)), conv, jnp.zeros((1, 2, 3, 3)))
  unit = energy.conv_counts(conv, spike, dense, 1, 2, _neuron())
  assert {k: unit[k] for k in ("sops", "in_spikes", "inputs", "outputs", "macs", "weights", "ann_inputs", "in_bits")} == {
      "sops": 4 * 5, "in_spikes": 4, "inputs": 18, "outputs": 30, "macs": 6 * 5 * 3, "weights": 15,
      "ann_inputs": 18, "in_bits": 2}   # 4 levels: 2-bit activations
  assert _priced(unit, "paper") == {"SOPs (0.9 pJ)": 20}
  assert _priced(unit, "snn") == {
      "accumulate (SOPs)": 20, "step integration": 30 * (2 - 1), "partial sums": 30 * 32 / W,
      "spikes read": 18 * 2 / W, "weights from DRAM": 15 * 8 / W, "weights": 15 * 8 / W}
  assert _priced(unit, "snn", reuse=False, spike_encoding="aer") == {
      "accumulate (SOPs)": 20, "step integration": 30, "partial sums": 2 * 20 * 32 / W,
      "spikes read": 4 * 5 / W,   # an address of ceil(log2 18) = 5 bits a spike
      "weights from DRAM": 15 * 8 / W, "weights": 20 * 8 / W}
  assert _priced(unit, "qann") == {
      "multiply": 90, "accumulate": 90, "partial sums": 30 * 32 / W, "activations read": 18 * 2 / W,
      "weights from DRAM": 15 * 8 / W, "weights": 15 * 8 / W}
  assert _priced(unit, "qann", reuse=False) == {
      "multiply": 90, "accumulate": 90, "partial sums": 2 * 90 * 32 / W, "activations read": 90 * 2 / W,
      "weights from DRAM": 15 * 8 / W, "weights": 90 * 8 / W}


def test_depthwise_three_by_three_counts_by_hand():
  conv = blocks.SynapticConv(2, 2, 3, groups=2, rngs=nnx.Rngs(0))
  conv.eval()
  spikes = np.zeros((1, 1, 4, 4, 2), np.float32)
  spikes[0, 0, 0, 0, 0] = 1      # a corner spike reaches 2x2 outputs of its channel
  spikes[0, 0, 1, 1, 1] = 1      # an interior one 3x3
  spike = _stats(lambda m, x: m(x, Forward.of("spike", collect=True)), conv, SpikeTrain(jnp.asarray(spikes), jnp.float32(1.0)))
  dense = _stats(lambda m, x: m(x, Forward.of(collect=True)), conv, jnp.zeros((1, 4, 4, 2)))
  unit = energy.conv_counts(conv, spike, dense, 1, 1, _neuron(1, 1))
  assert unit["sops"] == 4 + 9 and unit["macs"] == 16 * 2 * 9 and unit["weights"] == 18
  assert unit["outputs"] == unit["inputs"] == 32 and unit["in_bits"] == 1
  assert _priced(unit, "snn", reuse=False) == {
      "accumulate (SOPs)": 13, "step integration": 0, "partial sums": 2 * 13 * 32 / W, "spikes read": 32 / W,
      "weights from DRAM": 18 * 8 / W, "weights": 13 * 8 / W}
  assert _priced(unit, "qann", reuse=False)["weights"] == 288 * 8 / W


def test_attention_product_every_term_by_hand():
  owner = blocks.SynapticConv(1, 1, rngs=nnx.Rngs(0))
  a = np.zeros((2, 1, 2, 3), np.float32)   # T=2, batch 1, 2 tokens, 3 channels
  b = np.zeros((2, 1, 2, 3), np.float32)
  a[0, 0, 0, 0] = a[1, 0, 0, 0] = 1        # query 0, channel 0 fires twice
  b[0, 0, 1, 0] = 1                         # key 1, channel 0 once: meets both of a's spikes
  b[1, 0, 0, 2] = -1                        # key 0, channel 2: no partner
  spec = "bnd,bmd->bnm"
  product = lambda m, x, y, mode: attention._product(spec, x, y, Forward.of(mode, collect=True), m, "qk")
  spike = _stats(product, owner, SpikeTrain(jnp.asarray(a), jnp.float32(0.25)), SpikeTrain(jnp.asarray(b), jnp.float32(0.5)), "spike")
  dense = _stats(product, owner, jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), "quantize")
  by = energy._stats_by_layer({("x", k): v for k, v in {**spike}.items()})["x.qk"]
  dn = energy._stats_by_layer({("x", k): v for k, v in dense.items()})["x.qk"]
  unit = energy.product_counts(by, dn, 1, 2, _neuron(), _neuron(symmetric=True), scores=True)
  assert {k: unit[k] for k in ("sops", "outputs", "macs", "ann_outputs", "a_inputs", "a_spikes", "b_inputs",
                               "b_spikes", "a_bits", "b_bits")} == {
      "sops": 2, "outputs": 4, "macs": 4 * 3, "ann_outputs": 4, "a_inputs": 6, "a_spikes": 2, "b_inputs": 6,
      "b_spikes": 2, "a_bits": 2, "b_bits": 3}   # 4 levels; symmetric 7 levels: 3 bits
  # a binary operand is 1 bit a neuron and step, a ternary one 2
  assert _priced(unit, "snn") == {"accumulate (SOPs)": 2, "step integration": 4 * (2 * 2 - 1),
                                  "score buffer": 4 * 32 / W, "operand spikes read": (6 * 2 + 6 * 2 * 2) / W}
  assert _priced(unit, "snn", reuse=False) == {"accumulate (SOPs)": 2, "step integration": 12,
                                               "score buffer": 2 * 2 * 32 / W,
                                               "operand spikes read": 2 * (6 * 2 + 6 * 2 * 2) / W}
  assert _priced(unit, "qann") == {"multiply": 12, "accumulate": 12, "score buffer": 4 * 32 / W,
                                   "operands read": (6 * 2 + 6 * 3) / W}
  assert _priced(unit, "qann", reuse=False)["operands read"] == 12 * (2 + 3) / W
  assert _priced(unit, "paper") == {"SOPs (0.9 pJ)": 2}


def test_one_expg_neuron_over_t_steps_by_hand():
  neuron = ExpGIF(T=4, K=2)   # levels {0,1,2,3,4,6,8,9,12}/12: code 9 = 8 + 1 fires on steps 1 and 4
  x = jnp.asarray([9 / 12, 0.0, 12 / 12]).reshape(1, 1, 3, 1)
  spike = _stats(lambda m, v: m(v, Forward.of("spike", collect=True)), neuron, x)
  unit = energy.neuron_counts(neuron, spike, 1)
  assert unit == {"kind": "neuron", "T": 4, "neurons": 3, "spikes": 2 + 0 + 2, "levels": 9, "symmetric": False}
  assert _priced(unit, "snn") == {"level search": 3 * 4, "threshold compare per step": 3 * 4,
                                  "soft reset per spike": 4, "membrane": 3 * 32 / W, "spikes written": 3 * 4 / W}
  assert _priced(unit, "snn", reuse=False, spike_encoding="aer") == {
      "level search": 12, "threshold compare per step": 12, "soft reset per spike": 4,
      "membrane": 3 * (1 + 2 * 4) * 32 / W, "spikes written": 4 * 2 / W}   # ceil(log2 3) = 2-bit addresses
  assert _priced(unit, "qann") == {"level search": 12, "membrane read": 3 * 32 / W, "activations written": 3 * 4 / W}
  assert _priced(unit, "paper") == {}


@pytest.fixture(scope="module")
def small():
  """The small digits network of the training tests, random weights, and its report on two images."""
  model = models.create_model("ge2mst_tiny", 10, 0, image_size=16, widths=(8, 16, 16, 32), heads=(1, 1, 1),
                              stem_width=8, depths=(1, 1, 0, 0))
  model.eval()
  return model, energy.energy_report(model, jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))


def test_paper_model_is_todays_convention_unchanged(small):
  _, rep = small
  # Recorded with the energy report as it was before the hardware model (same network and images).
  assert rep["sops_per_image"] == 566740.5
  assert rep["energy_mj_per_image"] == pytest.approx(0.00051006645, rel=1e-12)
  assert rep["stem_energy_mj_per_image"] == pytest.approx(0.0002543616, rel=1e-12)
  assert rep["sops_per_stage"] == {"head": 785.0, "stage1": 291860.0, "stage2": 244719.5, "stage3": 19520.0,
                                   "stage4": 9856.0}
  paper = rep["hardware_energy"]["models"]["paper"]["per_stage_pj"]
  assert sum(v["arithmetic"] for k, v in paper.items() if k != "stem") * 1e-9 == pytest.approx(
      rep["energy_mj_per_image"], rel=1e-12)
  assert paper["stem"]["arithmetic"] * 1e-9 == pytest.approx(rep["stem_energy_mj_per_image"], rel=1e-12)


def test_counts_cover_the_network_and_reprice_from_json(small):
  model, rep = small
  hw = rep["hardware_energy"]
  counts = json.loads(json.dumps(hw["counts"]))
  assert sum(u["sops"] for u in counts.values() if "sops" in u) == pytest.approx(rep["sops_per_image"], rel=1e-12)
  assert sum(u["macs"] for u in counts.values() if "macs" in u) == rep["macs_per_image"]
  assert sum(u["weights"] for u in counts.values() if "weights" in u) + model.classifier.bias.size == sum(
      x.size for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[-1] == "kernel") + 10
  assert hardware.apply(counts, TABLE)["models"] == hw["models"]
  assert [k for k in counts][:2] == ["stem.conv", "stages.0.0.conv"] and list(counts)[-1] == "classifier"
  stem = counts["stem.conv"]   # 3x3, stride 1, 3 -> 8 channels on 16x16 pixels
  assert (stem["inputs"], stem["outputs"], stem["macs"], stem["weights"]) == (16 * 16 * 3, 16 * 16 * 8,
                                                                              16 * 16 * 8 * 27, 27 * 8)
  assert _priced(stem, "snn") == _priced(stem, "qann") == {
      "multiply": stem["macs"], "accumulate": stem["macs"], "weights from DRAM": 216 * 8 / W, "weights": 216 * 8 / W,
      "partial sums": 16 * 16 * 8 * 32 / W, "pixels read": 16 * 16 * 3 * 8 / W}
  assert hw["cheaper"] in ("snn", "qann") and set(hw["cheaper_per_layer"]) == set(counts)
  md = hardware.markdown(hw)
  assert "Cheaper in total" in md and md.count("| **total** |") == 3


@pytest.mark.parametrize("constant", ["paper_sop", "paper_mac", "accumulate", "multiply", "compare", "sram_8kb",
                                      "sram_1mb", "dram"])
def test_a_constant_changes_only_the_terms_that_use_it(small, constant):
  counts = small[1]["hardware_energy"]["counts"]
  changed = copy.deepcopy(TABLE)
  group, key = ("ops", "pj") if constant in TABLE["ops"] else ("memory", "pj_per_64b")
  changed[group][constant][key] *= 3
  before, after = hardware.apply(counts, TABLE), hardware.apply(counts, changed)
  used = False
  for model in hardware.MODELS:
    units = hardware.term_counts(counts, model, TABLE)
    delta = after["models"][model]["total_mj"] - before["models"][model]["total_mj"]
    assert delta * 1e9 == pytest.approx(units.get(constant, 0.0) * 2 * hardware.constant(TABLE, constant), rel=1e-9)
    for name, unit in counts.items():
      for t in hardware.terms(unit, model, TABLE):
        key = f"{t.category} | {t.what}"
        b, a = before["models"][model]["per_layer_pj"][name][key], after["models"][model]["per_layer_pj"][name][key]
        if t.constant == constant and t.count:
          used = True
          assert a == pytest.approx(3 * b, rel=1e-12)
        elif t.constant != constant:
          assert a == b
  assert used


def test_a_bad_table_is_a_one_line_error():
  bad = copy.deepcopy(TABLE)
  bad["placement"]["weights"] = "sram_2mb"
  with pytest.raises(ValueError, match="energy.placement.weights='sram_2mb' is not a memory level"):
    hardware.apply({}, bad)
  bad = copy.deepcopy(TABLE)
  bad["spike_encoding"] = "rle"
  with pytest.raises(ValueError, match="spike_encoding='rle'"):
    hardware.apply({}, bad)
