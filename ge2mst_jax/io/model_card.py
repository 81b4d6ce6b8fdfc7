"""The README.md model card of an export directory, generated from its manifest alone.

Every number on the card is a manifest value (the export's own counts, the run's summary and
the evaluation report it carries), so the card cannot say other than what was measured.
"""
from __future__ import annotations


def _pct(v) -> str:
  return "not evaluated" if v is None else f"{100 * v:.2f} %"


def _measured(manifest: dict, key: str):
  """A metric from the evaluation report (eval.py) of the exported step, else the run's summary."""
  return manifest.get("evaluation", {}).get(key, manifest.get("metrics", {}).get(key))


def model_card(manifest: dict) -> str:
  cfg = manifest["config"]
  arch, data = cfg["model"]["arch"], cfg["data"]
  name, dataset = cfg["model"]["name"], data["name"]
  ev = manifest.get("evaluation", {})
  inp = manifest["input"]
  head = "logits" if manifest["num_classes"] else "the pooled embedding"
  lines = ["---", "library_name: jax",
           "tags: [jax, flax, spiking-neural-network, vision-transformer, ge2mst]",
           "pipeline_tag: image-classification", f"datasets: [{dataset}]", "---", "",
           f"# {name} on {dataset} (Ge²mS-T)", "",
           f"A Ge²mS-T spiking vision transformer (ExpG-IF neurons, GW-SSA attention) trained with "
           f"ge2mst_jax {manifest['ge2mst_jax']}, checkpoint step {manifest['step']}. It runs as a quantized "
           f"network (quantize mode) or as T-step spike trains (spike mode), the same function.", "",
           "| | |", "|---|---|",
           f"| architecture | {name}: widths {tuple(arch['widths'])}, depths {tuple(arch['depths'])}, "
           f"heads {tuple(arch['heads'])}, GW-SSA strides {tuple(arch['gw_strides'])} |",
           f"| parameters | {manifest['params']:,} |",
           f"| time steps T, max spikes K | {arch['T']}, {arch['K']} |",
           f"| data set | {dataset} ({data['num_classes']} classes, {arch['image_size']}x{arch['image_size']} input) |",
           f"| accuracy, quantize mode | {_pct(_measured(manifest, 'accuracy_quantize'))} |",
           f"| accuracy, spike mode | {_pct(_measured(manifest, 'accuracy_spike'))} |",
           f"| identical predictions (spike vs quantize) | {_pct(_measured(manifest, 'prediction_agreement'))} |"]
  if "sops_per_image" in ev:
    lines += [f"| SOPs / image | {ev['sops_per_image'] / 1e6:,.3f} M |",
              f"| energy / image | {ev['energy_mj_per_image']:.5f} mJ |"]
    lines += [f"| energy / image, `{m}` energy model, stem included | {mj * 1e3:,.3f} µJ |"
              for m, mj in ev.get("energy_mj_per_image_by_model", {}).items()]
  else:
    lines.append("| SOPs, energy / image | not evaluated (run eval.py on the work directory before exporting) |")
  lines.append("")
  if "examples" in ev or "examples" in manifest.get("metrics", {}):
    lines.append(f"Accuracy over {int(_measured(manifest, 'examples'))} test images of {dataset}.")
  if "sops_per_image" in ev:
    lines.append(f"SOPs counted from the spikes of {ev.get('energy_images', 'the')} test images "
                 f"(the stem's multiply-accumulates excluded), energy at 0.9 pJ per SOP"
                 + ("; the energy models are ge2mst_jax's docs/energy.md." if "energy_mj_per_image_by_model" in ev else "."))
  mean, std = inp["mean"], inp["std"]
  lines += ["", "## Files", "", "| file | what |", "|---|---|",
            f"| `{manifest['file']}` | every model array (parameters, BatchNorm statistics, thresholds) under its "
            f"`/`-joined path; the training config in the metadata |",
            "| `config.json` | the training config |",
            "| `manifest.json` | step, sha256 of the weights and programs, metrics, the input the programs take |"]
  for mode, prog in manifest.get("programs", {}).items():
    lines.append(f"| `{prog['file']}` | {mode} mode as a `jax.export` program ({', '.join(prog['platforms'])}) |")
  lines += ["", "## Input", "",
            f"Float32 NHWC batches `[b, {', '.join(map(str, inp['shape'][1:]))}]`, pixels `x` in 0..255 "
            f"normalised per channel as `(x / 255 - mean) / std` with mean {tuple(mean)}, std {tuple(std)} "
            f"(`ge2mst_jax.eval_transform(config)` does it, resize included).", "",
            "## Use", "", "With ge2mst_jax:", "", "```python", "import ge2mst_jax",
            "model, config = ge2mst_jax.load(\"path/to/this/folder\")",
            "logits = model(ge2mst_jax.eval_transform(config)(uint8_images), mode=\"spike\")", "```", ""]
  if manifest.get("programs"):
    mode = "spike" if "spike" in manifest["programs"] else next(iter(manifest["programs"]))
    lines += [f"With JAX alone (any batch size; the output is {head}):", "", "```python", "import jax",
              f"program = jax.export.deserialize(bytearray(open(\"{manifest['programs'][mode]['file']}\", \"rb\").read()))",
              "out = program.call(images)", "```", ""]
  return "\n".join(lines)
