"""The constants of the hardware energy model (`evaluate/hardware.py`): one table, the run
config's `energy` key, each constant with its source, so that a user can put in their chip's.

It lives with the other config defaults (`saved_config.defaults`) because a config key's default
belongs to the lowest layer; the model that uses it reads it as a plain dict. Override one value
on the command line: `python eval.py --config configs/digits.py --config.energy.memory.dram.pj_per_64b=640`,
or re-apply a saved report with other constants (`hardware.apply`) without running the network.
"""
from __future__ import annotations

import ml_collections

_HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm, 0.9 V"


def _op(pj: float, source: str) -> dict:
  return {"pj": pj, "source": source}


def _level(pj_per_64b: float, source: str) -> dict:
  return {"pj_per_64b": pj_per_64b, "source": source}


def table() -> ml_collections.ConfigDict:
  """The default table: 45 nm figures from Horowitz (ISSCC 2014), the source the paper's own
  0.9 pJ / 4.6 pJ come from, so that the three models share one technology."""
  return ml_collections.ConfigDict({
      # Energy per operation, pJ.
      "ops": {
          # The paper's convention (docs/math.md#energy): every SOP a 32-bit float add, every MAC a float mult + add.
          # They price the `paper` model of the comparison; report.json's `energy_mj_per_image` and
          # `stem_energy_mj_per_image` keep the paper's own 0.9 / 4.6 pJ whatever is set here.
          "paper_sop": _op(0.9, f"{_HOROWITZ}: 32-bit float add (the paper's SOP)"),
          "paper_mac": _op(4.6, f"{_HOROWITZ}: 32-bit float mult 3.7 + add 0.9 (the paper's MAC)"),
          # The hardware model's integer datapath.
          "accumulate": _op(0.1, f"{_HOROWITZ}: 32-bit integer add (a weight or partial sum into the accumulator)"),
          "multiply": _op(0.2, f"{_HOROWITZ}: 8-bit integer mult (8-bit weight by an activation of at most 8 bits)"),
          "compare": _op(0.1, f"{_HOROWITZ}: 32-bit integer add (a comparison is a subtraction)"),
      },
      # Energy of one 64-bit access, pJ; traffic is counted in bits and packed into 64-bit words.
      # Reads and writes are charged alike (Horowitz gives reads).
      "memory": {
          "sram_8kb": _level(10.0, f"{_HOROWITZ}: 64-bit read of an 8 KB SRAM"),
          "sram_32kb": _level(20.0, f"{_HOROWITZ}: 64-bit read of a 32 KB SRAM"),
          "sram_1mb": _level(100.0, f"{_HOROWITZ}: 64-bit read of a 1 MB SRAM"),
          "dram": _level(1300.0, f"{_HOROWITZ}: 64-bit DRAM access, 1.3-2.6 nJ (the low end)"),
      },
      # Which memory level holds what (a key of `memory`).
      "placement": {
          "weight_store": "dram",     # where the weights live: read from it once per image
          "weights": "sram_1mb",      # the weight buffer, filled from the store once per image
          "membranes": "sram_8kb",    # partial sums and membrane potentials, beside the accumulators
          "activations": "sram_1mb",  # spikes (SNN) or quantized activations (ANN) between layers
          "scores": "sram_1mb",       # attention score maps (Q K^T), too large for the small SRAM
      },
      "bits": {"weight": 8, "accumulator": 32, "pixel": 8},
      # True: every weight is read from its SRAM once per image and held by its processing element
      # across the output positions and the T steps (weight-stationary), partial sums stay in the
      # accumulator while a position's inputs arrive. False: every SOP / MAC reads its weight and
      # reads and writes its partial sum.
      "reuse": True,
      # How spikes are stored and moved: 'bitmap' (1 bit per neuron and step, 2 when ternary) or
      # 'aer' (address-event: one address of ceil(log2 neurons) bits per spike, +1 sign bit when ternary).
      "spike_encoding": "bitmap",
  })
