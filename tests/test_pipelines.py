"""Ge2mS-T inside other JAX pipelines: the backbone, the Linen module, the serialized programs
and the export folder, on conftest's trained digits checkpoint."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ge2mst_jax
from ge2mst_jax.io.model_card import model_card
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.io import saved_config
from ge2mst_jax.nn import linen, models
from ge2mst_jax.train.finetune import load_matching
from tests import cpu

pytestmark = pytest.mark.xdist_group("trained_digits")


def digits_test_images(cfg) -> tuple[np.ndarray, np.ndarray]:
  """The digits test split as a user has it: raw uint8 images through the checkpoint's transform."""
  source = data_lib.make_source(cfg.data, "test")
  raw = np.stack([source[i]["image"] for i in range(len(source))])
  return ge2mst_jax.eval_transform(cfg)(raw), np.asarray([source[i]["label"] for i in range(len(source))])


@nnx.jit
def _backbone_outputs(model, backbone, maps_only, x):
  return {mode: (model.features(x, mode=mode), backbone(x, mode=mode), maps_only(x, mode=mode))
          for mode in ("quantize", "spike")}


def test_backbone_stage_maps_and_embedding_in_both_modes(trained):
  cfg, workdir, _ = trained
  model, _ = ge2mst_jax.load(workdir)
  backbone, _ = ge2mst_jax.load(workdir, num_classes=0)
  maps_only = models.Ge2msT(model.cfg, features_only=True, rngs=nnx.Rngs(0))
  nnx.update(maps_only, nnx.state(backbone))
  maps_only.eval()
  x = digits_test_images(cfg)[0][:8]
  got = _backbone_outputs(model, backbone, maps_only, x)
  (logits_q, out_q), emb_q, maps_q = got["quantize"]
  (logits_s, out_s), emb_s, maps_s = got["spike"]
  info = model.feature_info
  assert [f["num_chs"] for f in info] == list(cfg.model.arch.widths) and [f["reduction"] for f in info] == [1, 2, 4, 8]
  for f, mq, ms in zip(info, maps_q, maps_s):
    name, size = f["module"], cfg.data.image_size // f["reduction"]
    assert out_q[name].shape == (8, size, size, f["num_chs"])
    np.testing.assert_array_equal(mq, out_q[name])
    np.testing.assert_array_equal(ms, out_s[name])
    # The spikes the map is sent as: binary, T steps, decoding to the map; the same values in both modes.
    train = out_s["spikes"][name]
    assert train.spikes.shape == (cfg.model.arch.T, *out_q[name].shape)
    assert set(np.unique(train.spikes)) <= {0.0, 1.0} and 0 < float(jnp.mean(train.spikes)) < 1
    np.testing.assert_array_equal(train.decode(), out_s[name])
    np.testing.assert_allclose(out_s[name], out_q[name], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out_q["logits"], logits_q)
  for emb, out, logits in ((emb_q, out_q, logits_q), (emb_s, out_s, logits_s)):
    assert emb.shape == (8, cfg.model.arch.widths[-1])
    np.testing.assert_allclose(emb, out["pre_logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(emb, jnp.mean(out["stage4"], axis=(1, 2)), rtol=1e-6, atol=1e-6)
    # The embedding is what the classifier reads: the trained head on it gives the logits.
    head = emb @ model.classifier.kernel[0, 0] + model.classifier.bias[...]
    np.testing.assert_allclose(head, logits, rtol=1e-4, atol=1e-4)
  assert np.argmax(logits_q, -1).tolist() == np.argmax(logits_s, -1).tolist()

  # A new head: fine-tuning's copy by path loads every array of the backbone and keeps the head fresh.
  ten = ge2mst_jax.load(workdir, num_classes=3)[0]
  assert ten.classifier.kernel.shape[-1] == 3
  merged, loaded, skipped = load_matching(nnx.to_pure_dict(nnx.state(ten)), nnx.to_pure_dict(nnx.state(backbone)))
  assert skipped == ["classifier/bias", "classifier/kernel"] and len(loaded) == len(jax.tree.leaves(nnx.state(backbone)))
  with pytest.raises(ValueError, match=r"features\(\) runs in mode 'quantize' or 'spike', not 'stbp'"):
    model.features(x, mode="stbp")


def test_linen_module_gives_the_loaded_logits_and_trains(trained):
  cfg, workdir, _ = trained
  model, _ = ge2mst_jax.load(workdir)
  module, variables = ge2mst_jax.to_linen(model)
  assert set(variables) == {"params", "batch_stats"}
  assert variables["batch_stats"]["stem"]["conv"]["bn"]["mean"].shape == (cfg.model.arch.stem_width,)
  assert variables["params"]["head_if"]["lam"] == model.head_if.lam[...]
  images, labels = digits_test_images(cfg)
  x, y = images[:32], labels[:32]
  apply = jax.jit(lambda v, x: {mode: module.apply(v, x, mode=mode) for mode in ("quantize", "spike")})
  want = nnx.jit(lambda m, x: {mode: m(x, mode=mode) for mode in ("quantize", "spike")})(model, x)
  for mode, got in apply(variables, x).items():
    np.testing.assert_array_equal(got, want[mode], err_msg=mode)

  # A Linen + optax train step from a fresh initialisation: batch statistics mutable, the loss falls.
  fresh = module.init(jax.random.key(1), x, train=True)
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(p):
      logits, updates = module.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = fresh["params"], fresh["batch_stats"]
  opt_state, losses = tx.init(params), []
  for _ in range(8):
    params, new_stats, opt_state, loss = step(params, batch_stats, opt_state)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, new_stats, batch_stats))   # running statistics move
    batch_stats = new_stats
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """An export folder of the trained run, with an evaluation report of the exported step beside
  the run (eval.py's place for it) whose figures the card must show."""
  cfg, workdir, out = trained
  wd = tmp_path_factory.mktemp("run")
  for name in ("checkpoints", "config.json", "summary.json"):
    (shutil.copytree if name == "checkpoints" else shutil.copy)(os.path.join(workdir, name), wd / name)
  report = {"step": 8, "accuracy_quantize": out["accuracy_quantize"], "accuracy_spike": out["accuracy_spike"],
            "prediction_agreement": 1.0, "examples": 360.0, "sops_per_image": 1234567.0,
            "energy_mj_per_image": 0.9e-9 * 1234567.0, "energy_images": 16, "T": 4, "K": 2, "sops_per_layer": {},
            "hardware_energy": {"models": {"paper": {"total_mj": 0.0012}, "snn": {"total_mj": 0.0031}}, "cheaper": "snn"}}
  (wd / "eval").mkdir()
  (wd / "eval" / "report.json").write_text(json.dumps(report))
  folder = tmp_path_factory.mktemp("export") / "digits-ge2mst"
  assert ge2mst_jax.export(wd, folder, platforms=("cuda", "cpu")) == str(folder)
  return folder, report


def test_export_folder_is_a_model_repository_with_a_card_of_its_numbers(trained, exported):
  cfg, workdir, out = trained
  folder, report = exported
  assert sorted(os.listdir(folder)) == ["README.md", "config.json", "manifest.json", "model.quantize.jaxexport",
                                        "model.safetensors", "model.spike.jaxexport"]
  manifest = json.loads((folder / "manifest.json").read_text())
  for entry in (manifest, *manifest["programs"].values()):
    assert hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
  assert manifest["programs"]["spike"]["platforms"] == ["cpu", "cuda"]
  assert manifest["input"] == {"shape": ["b", 16, 16, 3], "dtype": "float32", "mean": [0.5] * 3, "std": [0.5] * 3}
  assert manifest["evaluation"]["sops_per_image"] == report["sops_per_image"] and "sops_per_layer" not in manifest["evaluation"]
  assert manifest["evaluation"]["energy_mj_per_image_by_model"] == {"paper": 0.0012, "snn": 0.0031}
  assert saved_config.diff(saved_config.read(folder), cfg) == []
  model, _ = ge2mst_jax.load(workdir)
  assert manifest["params"] == models.count_params(model)

  card = (folder / "README.md").read_text()
  assert card.startswith("---\nlibrary_name: jax\n") and "datasets: [digits]" in card
  for row in (f"| parameters | {models.count_params(model):,} |", "| time steps T, max spikes K | 4, 2 |",
              f"| accuracy, quantize mode | {100 * out['accuracy_quantize']:.2f} % |",
              f"| accuracy, spike mode | {100 * out['accuracy_spike']:.2f} % |",
              "| SOPs / image | 1.235 M |", "| energy / image | 0.00111 mJ |",
              "| energy / image, `snn` energy model, stem included | 3.100 µJ |",
              "| data set | digits (10 classes, 16x16 input) |", "model.spike.jaxexport` | spike mode as a `jax.export` "
              "program (cpu, cuda) |", "Accuracy over 360 test images of digits.", "checkpoint step 8"):
    assert row in card, row
  # Without a report of the exported step, the card says so instead of showing a figure.
  del manifest["evaluation"]
  assert "| SOPs, energy / image | not evaluated" in model_card(manifest)

  x = digits_test_images(cfg)[0][:4]
  run = nnx.jit(lambda m, x: (m(x, mode="quantize"), m(x, mode="spike")))
  for a, b in zip(run(model, x), run(ge2mst_jax.load(folder)[0], x)):
    np.testing.assert_array_equal(a, b)


# A serving process: JAX and numpy only. Runs each serialized program on the images, writes
# the logits, and says which platforms it was exported for and whether ge2mst_jax was imported.
RUN_WITHOUT_THE_PACKAGE = """
import sys
import jax
import numpy as np

folder, images, out = sys.argv[1:]
x = np.load(images)
logits = {}
for mode in ("quantize", "spike"):
  with open(f"{folder}/model.{mode}.jaxexport", "rb") as f:
    program = jax.export.deserialize(bytearray(f.read()))
  logits[mode] = np.asarray(program.call(x))
  half = np.asarray(program.call(x[:7]))   # the batch dimension is symbolic
  assert np.allclose(half, logits[mode][:7], rtol=1e-5, atol=1e-5)
np.savez(out, **logits)
print(",".join(program.platforms), any(m.split(".")[0] == "ge2mst_jax" for m in sys.modules))
"""


def test_serialized_programs_run_without_the_package_and_predict_what_load_does(trained, exported, tmp_path):
  cfg, workdir, _ = trained
  folder, _ = exported
  images, _ = digits_test_images(cfg)
  np.save(tmp_path / "images.npy", images)
  r = subprocess.run([sys.executable, "-c", RUN_WITHOUT_THE_PACKAGE, str(folder), str(tmp_path / "images.npy"),
                      str(tmp_path / "logits.npz")], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                     env=cpu.env(devices=1))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["cpu,cuda", "False"]
  served = np.load(tmp_path / "logits.npz")
  model, _ = ge2mst_jax.load(workdir)
  want = nnx.jit(lambda m, x: {mode: m(x, mode=mode) for mode in ("quantize", "spike")})(model, images)
  for mode in ("quantize", "spike"):
    assert served[mode].shape == (360, 10)
    np.testing.assert_array_equal(np.argmax(served[mode], -1), np.argmax(want[mode], -1))
    np.testing.assert_allclose(served[mode], want[mode], rtol=1e-5, atol=1e-5)
