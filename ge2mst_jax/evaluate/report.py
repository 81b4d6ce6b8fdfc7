"""Evaluating a checkpoint as spikes: accuracy in both modes, agreement, SOPs, energy, plots."""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.evaluate import energy, hardware
from ge2mst_jax.nn import models
from ge2mst_jax.io import paths
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.evaluate import spike_audit
from ge2mst_jax.train import state as train_state
from ge2mst_jax.train.evaluator import evaluate
from ge2mst_jax.nn.attention import SpikingAttention


def _with_arch(cfg, **arch):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    for k, v in arch.items():
      if v is not None:
        cfg.model.arch[k] = v
  return cfg


def restore_for_eval(cfg, checkpoint_dir: str, step: int | None = None):
  """(setup, state, step) with the checkpoint restored onto this machine's mesh; damage is an error."""
  mesh = shd.make_mesh(cfg.mesh.fsdp if jax.device_count() % max(cfg.mesh.fsdp, 1) == 0 else 1)
  setup, step = train_state.restore_train_state(cfg, checkpoint_dir, mesh, step, fallback=False)
  return setup, setup.state, step


def _energy_batch(cfg, n: int) -> np.ndarray:
  images = []
  for b in data_lib.eval_batches(cfg.data, cfg.eval_batch_size):
    images.append(b["image"][b["mask"]])
    if sum(len(x) for x in images) >= n:
      break
  return np.concatenate(images)[:n]


def ungrouped_bound(rep: dict, model) -> dict[str, float]:
  """SOPs the attention products would cost without GW grouping, at the measured spike densities.

  A token in an s x s grouping attends to 1/s^2 of the tokens; ungrouped, each product
  sums over s^2 times as many partners, so the bound is the grouped count times s^2.
  """
  strides = {".".join(map(str, path)): m.stride or 1 for path, m in nnx.iter_graph(model)
             if isinstance(m, SpikingAttention)}
  out = {}
  for name, v in rep["sops_per_layer"].items():
    base, _, kind = name.rpartition(".")
    if kind in ("qk", "av") and base in strides:
      out[name] = v * strides[base] ** 2
  return out


def evaluate_checkpoint(cfg, checkpoint_dir: str, step: int | None = None, energy_images: int = 64,
                        T: int | None = None, K: int | None = None, audit: bool = False) -> dict[str, Any]:
  """Accuracy in every mode over the test split, and the energy report on `energy_images` test
  images; `audit`: also the spike-driven audit (`spike_audit.py`) of spike mode on those images."""
  cfg = _with_arch(cfg, T=T, K=K)
  setup, state, step = restore_for_eval(cfg, checkpoint_dir, step)
  arch = models.arch_from_config(cfg)
  acc = evaluate(cfg, setup, state, modes=arch.eval_modes, progress=True)
  model, _ = train_state.model_and_optimizer(setup.graphdef, state)
  model.eval()
  images = _energy_batch(cfg, energy_images)
  rep = energy.energy_report(model, images, cfg.energy)
  if audit:
    rep["spike_audit"] = spike_audit.audit(model, images, energy_sops=rep["sops_per_layer"])
  return {
      "step": step, "checkpoint": str(paths.resolve(checkpoint_dir)), "T": arch.T, "K": arch.K,
      "paradigm": arch.paradigm, "params": models.count_params(model), "energy_images": int(len(images)),
      "accuracy_quantize": acc.get("accuracy_quantize"), "accuracy_spike": acc.get("accuracy_spike"),
      **{k: v for k, v in acc.items() if k.startswith("top5") or k == "accuracy_stbp"},
      "prediction_agreement": acc.get("prediction_agreement"), "max_rel_logit_diff": acc.get("max_rel_logit_diff"),
      "examples": acc.get("examples"), **rep, "ungrouped_attention_sops": ungrouped_bound(rep, model),
  }


# ----------------------------------------------------------------------------
# Writing the report
# ----------------------------------------------------------------------------
def _module_sops(rep: dict) -> dict[str, dict[str, float]]:
  """SOPs per attention block (attention path + conv branch) and feed-forward block, in order."""
  layers = rep["sops_per_layer"]
  module = lambda name: ".".join(name.split(".")[:3])
  attn_modules = {module(n) for n in layers if n.startswith("stages.") and ".attn." in n}
  attn, ffn = {}, {}
  for name, v in layers.items():
    parts = name.split(".")
    if parts[0] != "stages" or len(parts) < 4:
      continue
    if module(name) in attn_modules:
      attn[module(name)] = attn.get(module(name), 0.0) + v
    elif parts[3] in ("fc1", "dw", "fc2"):
      ffn[module(name)] = ffn.get(module(name), 0.0) + v
  bound = dict(attn)
  for name, v in rep["ungrouped_attention_sops"].items():
    bound[module(name)] += v - layers[name]
  return {"attention": attn, "feedforward": ffn, "attention_ungrouped": bound}


def _save_figure(fig, path) -> str:
  import io
  buf = io.BytesIO()  # through epath: the report directory may be in a bucket
  fig.savefig(buf, format="png", dpi=110)
  epath.Path(path).write_bytes(buf.getvalue())
  return str(path)


def plot_report(rep: dict, out_dir) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mods = _module_sops(rep)
  out_dir, files = epath.Path(out_dir), []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, title in ((axes[0], "attention", "Attention modules"), (axes[1], "feedforward", "Feed-forward modules")):
    names = list(mods[key])
    ax.plot(range(1, len(names) + 1), np.cumsum([mods[key][n] / 1e6 for n in names]), "o-", label="Ge²mS-T")
    if key == "attention":
      ax.plot(range(1, len(names) + 1), np.cumsum([mods["attention_ungrouped"][n] / 1e6 for n in names]), "s--",
              label="ungrouped SSA (bound)")
    labels = [f"stage{int(n.split('.')[1]) + 1}.{n.split('.')[2]}" for n in names]
    ax.set_xticks(range(1, len(names) + 1), labels, rotation=45, fontsize=7)
    ax.set_ylabel("cumulative SOPs / image (M)")
    ax.set_title(title)
    ax.legend()
  fig.tight_layout()
  files.append(_save_figure(fig, out_dir / "sops.png"))
  plt.close(fig)
  rates = rep["firing_rates"]
  fig, ax = plt.subplots(figsize=(11, 3.5))
  ax.bar(range(len(rates)), list(rates.values()))
  ax.set_xlabel("neuron layer (network order)")
  ax.set_ylabel("firing rate (spikes / neuron / step)")
  ax.set_title(f"Firing rates, T={rep['T']}, K={rep['K']} (mean {rep['mean_firing_rate']:.3f})")
  fig.tight_layout()
  files.append(_save_figure(fig, out_dir / "firing_rates.png"))
  plt.close(fig)
  if rep.get("hardware_energy"):
    files.append(hardware.plot(rep["hardware_energy"], out_dir / "energy.png", _save_figure))
  return files


def markdown_report(rep: dict, sweep: list[dict] | None = None) -> str:
  pct = lambda v: "—" if v is None else f"{100 * v:.2f} %"
  lines = [f"# Ge²mS-T evaluation (step {rep['step']}, T={rep['T']}, K={rep['K']})", "",
           f"Checkpoint: `{rep['checkpoint']}`; {int(rep['examples'])} test examples; "
           f"{rep['params']:,} parameters.", "",
           "| metric | value |", "|---|---|",
           f"| accuracy, quantize mode | {pct(rep['accuracy_quantize'])} |",
           f"| accuracy, spike mode | {pct(rep['accuracy_spike'])} |"]
  for k in ("accuracy_stbp", "top5_accuracy_quantize", "top5_accuracy_spike", "top5_accuracy_stbp"):
    if k in rep:
      lines.append(f"| {k.replace('_', ' ')} | {pct(rep[k])} |")
  diff = rep["max_rel_logit_diff"]
  lines += [f"| identical predictions (spike vs quantize) | {pct(rep['prediction_agreement'])} |",
            f"| max relative logit difference | {'—' if diff is None else f'{diff:.2e}'} |",
            f"| SOPs / image (stem excluded) | {rep['sops_per_image'] / 1e6:,.3f} M |",
            f"| energy / image (0.9 pJ per SOP) | {rep['energy_mj_per_image']:.5f} mJ |",
            f"| stem MACs / image (4.6 pJ per MAC) | {rep['stem_macs_per_image'] / 1e6:,.3f} M = "
            f"{rep['stem_energy_mj_per_image']:.5f} mJ |",
            f"| ANN-equivalent MACs / image | {rep['macs_per_image'] / 1e6:,.3f} M |",
            f"| mean firing rate | {rep['mean_firing_rate']:.4f} |"]
  hw = rep.get("hardware_energy")
  if hw:
    models = hw["models"]
    lines += [f"| energy / image, {hardware.TITLES[m]}, stem included | {models[m]['total_mj'] * 1e3:,.3f} µJ |"
              for m in hardware.MODELS]
    lines.append(f"| cheaper on this hardware model | {hardware.CHEAPER[hw['cheaper']]} |")
  lines += ["",
            f"SOPs counted exactly from the spikes of {rep['energy_images']} test images.", "",
            "## SOPs per stage", "", "| stage | M SOPs / image |", "|---|---|"]
  lines += [f"| {k} | {v / 1e6:,.4f} |" for k, v in sorted(rep["sops_per_stage"].items())]
  lines += ["", "## SOPs per block", "", "| block | M SOPs / image |", "|---|---|"]
  lines += [f"| {k} | {v / 1e6:,.4f} |" for k, v in rep["sops_per_block"].items()]
  if sweep:
    lines += ["", "## Sweep", "", "| T | K | acc. quantize | acc. spike | agreement | M SOPs | mJ |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['K']} | {pct(r['accuracy_quantize'])} | {pct(r['accuracy_spike'])} | "
              f"{pct(r['prediction_agreement'])} | {r['sops_per_image'] / 1e6:,.3f} | {r['energy_mj_per_image']:.5f} |"
              for r in sweep]
  if "spike_audit" in rep:
    lines += ["", "## Spike audit", "", spike_audit.markdown_table(rep["spike_audit"])]
  if hw:
    lines += ["", "## Energy: paper convention, spiking hardware model, quantized ANN", "", hardware.markdown(hw),
              "", "![energy per stage](energy.png)"]
  lines += ["", "![SOPs](sops.png)", "", "![firing rates](firing_rates.png)", ""]
  return "\n".join(lines)


def write_report(rep: dict, out_dir, sweep: list[dict] | None = None) -> dict[str, str]:
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  full = dict(rep, sweep=[{k: r[k] for k in ("T", "K", "accuracy_quantize", "accuracy_spike", "prediction_agreement",
                                               "max_rel_logit_diff", "sops_per_image", "energy_mj_per_image")}
                          for r in sweep or []])
  (out_dir / "report.json").write_text(json.dumps(full, indent=2, default=float))
  (out_dir / "report.md").write_text(markdown_report(rep, sweep))
  plots = plot_report(rep, out_dir)
  return {"json": str(out_dir / "report.json"), "md": str(out_dir / "report.md"), "plots": plots}
