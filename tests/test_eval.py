"""eval.py's library, load/export and fine-tuning, on a checkpoint from a short digits run."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ge2mst_jax
from ge2mst_jax.train import checkpoint as ckpt_lib
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax import weights
from ge2mst_jax.io import saved_config
from ge2mst_jax.evaluate import report as evaluation
from ge2mst_jax.train import evaluator as evaluators, loop as train_lib, state as train_state
from ge2mst_jax.train import sharding as shd
from tests.test_models import both_modes
from tests.test_train import ROOT, cross_device_ops, small_digits

# The tests share a module fixture: one worker computes it once.
pytestmark = pytest.mark.xdist_group("trained_digits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits"))
  cfg = small_digits(8, checkpoint_every=4)   # the train step most tests share: compiled once
  out = train_lib.train_and_evaluate(cfg, workdir, quiet=True)
  return cfg, workdir, out


def test_report_has_every_key_and_matches_training(trained, tmp_path):
  cfg, workdir, out = trained
  rep = evaluation.evaluate_checkpoint(cfg, os.path.join(workdir, "checkpoints"), energy_images=16, audit=True)
  sweep = [evaluation.evaluate_checkpoint(cfg, os.path.join(workdir, "checkpoints"), energy_images=16, T=2, K=1)]
  files = evaluation.write_report(rep, str(tmp_path), sweep)
  with open(files["json"]) as f:
    js = json.load(f)
  for key in ("accuracy_quantize", "accuracy_spike", "prediction_agreement", "max_rel_logit_diff", "sops_per_image",
              "energy_mj_per_image", "firing_rates", "params", "T", "K", "sops_per_stage", "sops_per_block",
              "sops_per_layer", "stem_macs_per_image", "sweep"):
    assert key in js, key
  assert js["T"] == 4 and js["K"] == 2 and js["step"] == 8
  # evaluated at the training T, the checkpoint reproduces its training-time accuracy
  assert js["accuracy_quantize"] == out["accuracy_quantize"] and js["accuracy_spike"] == out["accuracy_spike"]
  assert js["accuracy_spike"] == js["accuracy_quantize"] and js["prediction_agreement"] >= 0.99
  assert js["energy_mj_per_image"] == pytest.approx(0.9e-9 * js["sops_per_image"])
  assert 0 < js["mean_firing_rate"] < 1 and js["params"] > 0
  assert js["sweep"][0]["T"] == 2 and js["sweep"][0]["K"] == 1
  for plot in files["plots"]:
    with open(plot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "accuracy, spike mode" in open(files["md"]).read()
  # eval.py --audit on the trained checkpoint: spike-driven everywhere but the stem, SOPs as counted
  audit = js["spike_audit"]
  assert audit["unexpected"] == [] and audit["expected_exceptions"] == ["stem.conv"] and audit["sops_match"]
  assert audit["audit_sops_per_image"] == pytest.approx(js["sops_per_image"], rel=1e-6)
  assert "## Spike audit" in open(files["md"]).read()


def test_evaluation_on_eight_devices_stays_data_parallel_in_both_modes(trained):
  """Each device evaluates its own images: spike mode's (T, B) steps fold batch-major
  (`blocks.fold_steps`), and no activation is gathered across devices."""
  cfg, _, out = trained
  setup = out["setup"]
  assert setup.mesh.devices.size == 8
  step = evaluators.make_eval_step(cfg, setup, ("quantize", "spike"))   # the run's own program
  _, metrics = nnx.split(evaluators.EvalMetrics(("quantize", "spike"), cfg.data.num_classes))
  batch = shd.global_batch(next(data_lib.eval_batches(cfg.data, cfg.eval_batch_size, 8)), setup.mesh)
  assert cross_device_ops(step, out["state"], metrics, batch) == []


def test_load_export_round_trip_gives_identical_logits(trained, tmp_path):
  cfg, workdir, _ = trained
  model, loaded_cfg = ge2mst_jax.load(workdir)
  assert loaded_cfg.model.name == cfg.model.name
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  path = ge2mst_jax.export(workdir, str(tmp_path / "digits.safetensors"))
  model2, _ = ge2mst_jax.load(path)
  for a, b in zip(both_modes(model, x), both_modes(model2, x)):
    np.testing.assert_array_equal(a, b)


def test_a_loaded_or_exported_model_scores_its_evaluated_accuracy_from_raw_images(trained, tmp_path):
  """As a user in another pipeline: raw uint8 images as the data set ships them, the transform
  the checkpoint's config describes, the model: the accuracy the run evaluated."""
  cfg, workdir, out = trained
  source = data_lib.make_source(cfg.data, "test")
  raw = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  assert raw.dtype == np.uint8 and len(raw) == 360
  path = ge2mst_jax.export(workdir, str(tmp_path / "digits.safetensors"))
  manifest = json.loads(weights.manifest_path(path).read_text())
  with open(path, "rb") as f:
    assert manifest["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert manifest["step"] == 8 and manifest["ge2mst_jax"] == ge2mst_jax.__version__
  assert manifest["metrics"]["accuracy_spike"] == out["accuracy_spike"] and manifest["config"]["data"]["norm"] == "digits"
  predict = nnx.jit(lambda m, x: jnp.argmax(m(x, mode="spike"), -1))
  for model, config in (ge2mst_jax.load(workdir), ge2mst_jax.load(path)):
    images = ge2mst_jax.eval_transform(config)(raw)
    hits = np.concatenate([np.asarray(predict(model, images[i:i + 120])) == labels[i:i + 120] for i in range(0, 360, 120)])
    assert hits.mean() == out["accuracy_spike"]
  batch = next(data_lib.eval_batches(cfg.data, 120))   # the transform is the pipeline's evaluation transform
  np.testing.assert_array_equal(images[:120], batch["image"])
  with pytest.raises(ValueError, match=r"Images of shape \(16, 16, 3\): pass a batch .*images\[None\]"):
    ge2mst_jax.eval_transform(cfg)(raw[0])


# Keys added to the config over time: a work directory or export from before any of them must
# still load, read every one at today's default, and evaluate as it did.
NEWER_KEYS = ("eval_matmul_precision", "profile", "compile_cache_dir", "distributed", "alpha.power",
              "data.event_frames", "model.arch.event_frames", "data.randaugment", "data.random_erasing",
              "data.random_erasing_mode", "data.decode_in_workers", "data.read_threads", "data.eval_policy")


def test_a_config_saved_before_newer_keys_loads_and_evaluates_with_their_defaults(trained, tmp_path):
  cfg, workdir, out = trained
  old = json.loads(saved_config.read(workdir).to_json())
  for key in NEWER_KEYS:
    *path, last = key.split(".")
    node = old
    for p in path:
      node = node[p]
    del node[last]
  (tmp_path / saved_config.FILE).write_text(json.dumps(old))
  read = saved_config.read(tmp_path)
  assert saved_config.diff(read, cfg) == []    # every key back, at the value the run itself had
  assert read.eval_matmul_precision == "highest" and read.profile.steps == 0 and not read.distributed.enabled
  read.data.image_size = 20                     # the shared fields are one value again
  assert read.model.arch.image_size == 20
  read.data.image_size = cfg.data.image_size
  rep = evaluation.evaluate_checkpoint(read, os.path.join(workdir, "checkpoints"), energy_images=16)
  assert rep["accuracy_quantize"] == out["accuracy_quantize"] and rep["accuracy_spike"] == out["accuracy_spike"]


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_evaluation_sets_its_matmul_precision(precision):
  """Accelerators run float32 matmuls at reduced precision unless asked: evaluation asks for
  `eval_matmul_precision` on every dot and convolution of both modes (read from the lowered
  program, which is what an accelerator compiles)."""
  cfg = small_digits(8, eval_matmul_precision=precision)
  setup = train_state.abstract_train_state(cfg, shd.make_mesh(1))
  _, metrics_state = nnx.split(evaluators.EvalMetrics(("quantize", "spike"), 10))
  batch = {"image": jax.ShapeDtypeStruct((120, 16, 16, 3), np.float32),
           "label": jax.ShapeDtypeStruct((120,), np.int32), "mask": jax.ShapeDtypeStruct((120,), bool)}
  text = evaluators.make_eval_step(cfg, setup).lower(setup.abstract, metrics_state, batch).as_text()
  ops = [l for l in text.splitlines() if "stablehlo.dot_general" in l or "stablehlo.convolution" in l]
  assert len(ops) > 20 and all(("HIGHEST" in l) == (precision == "highest") for l in ops)


def test_damaged_and_missing_checkpoints_are_clear_errors(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(ckpt_lib.CheckpointError, match="Nothing to load at .*nowhere"):
    ge2mst_jax.load(str(tmp_path / "nowhere"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(ckpt_lib.CheckpointError, match="bad.safetensors is not a readable"):
    ge2mst_jax.load(str(bad))
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  for root, _, files in os.walk(broken / "checkpoints" / "8" / "state"):
    for name in files:
      if not name.endswith(".json"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--workdir", str(broken), "--step", "8"],
                     capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode != 0
  assert "checkpoints/8" in r.stderr and "damaged" in r.stderr


def test_finetune_start_reports_the_replaced_head(trained, tmp_path, capsys):
  _, workdir, _ = trained
  cfg = small_digits(8, **{"init_from.checkpoint": workdir})
  cfg.eval_modes = ("quantize",)
  train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  msg = capsys.readouterr().out
  assert "Fine-tuning from" in msg and "classifier/kernel" in msg and "classifier/bias" in msg
  assert "loaded" in msg and "stem" not in msg.split("kept fresh")[1]
