"""eval.py's library, load/export, fine-tuning and the checkpoint format, on a checkpoint from a
short digits run."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import save as safetensors_to_bytes

import ge2mst_jax
from ge2mst_jax.train import checkpoint as ckpt_lib
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax import weights
from ge2mst_jax.io import saved_config
from ge2mst_jax.evaluate import hardware, report as evaluation
from ge2mst_jax.train import evaluator as evaluators, loop as train_lib, state as train_state
from ge2mst_jax.io import saved_config
from ge2mst_jax.train import sharding as shd
from tests import cpu
from tests.test_models import both_modes
from tests.test_train import ROOT, cross_device_ops, small_digits

# The tests share conftest's `trained` checkpoint: one worker computes it once.
pytestmark = pytest.mark.xdist_group("trained_digits")


@pytest.mark.slow
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
  # the three energy models, re-priced from report.json's counts alone, and their section and plot
  hw = js["hardware_energy"]
  assert hw["models"]["paper"]["total_mj"] == pytest.approx(js["energy_mj_per_image"] + js["stem_energy_mj_per_image"])
  assert hardware.apply(hw["counts"], cfg.energy)["models"] == hw["models"]
  assert str(tmp_path / "energy.png") in files["plots"]
  assert "## Energy: paper convention, spiking hardware model, quantized ANN" in open(files["md"]).read()
  # eval.py --audit on the trained checkpoint: spike-driven everywhere but the stem, SOPs as counted
  audit = js["spike_audit"]
  assert audit["unexpected"] == [] and audit["expected_exceptions"] == ["stem.conv"] and audit["sops_match"]
  assert audit["audit_sops_per_image"] == pytest.approx(js["sops_per_image"], rel=1e-6)
  assert "## Spike audit" in open(files["md"]).read()


@pytest.mark.slow
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
  # An export of format 1 (attention paths as before format 2) loads into the same model.
  flat, meta = weights._read_safetensors(pathlib.Path(path).read_bytes())
  old = saved_config.flat(_format_1_paths(traverse_util.unflatten_dict(flat, sep="/")))
  assert any("/attn/q/conv/" in k for k in old)
  (tmp_path / "v1.safetensors").write_bytes(safetensors_to_bytes(old, metadata={**meta, "format": "ge2mst_jax/1"}))
  model3, _ = ge2mst_jax.load(tmp_path / "v1.safetensors")
  for a, b in zip(both_modes(model, x), both_modes(model3, x)):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "v9.safetensors").write_bytes(safetensors_to_bytes(old, metadata={**meta, "format": "ge2mst_jax/9"}))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"has export format 'ge2mst_jax/9'; this ge2mst_jax reads"):
    ge2mst_jax.load(tmp_path / "v9.safetensors")


@pytest.mark.slow
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
              "data.random_erasing_mode", "data.decode_in_workers", "data.read_threads", "data.eval_policy", "energy")


@pytest.mark.slow
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
  assert read.energy.ops.paper_sop.pj == 0.9 and read.energy.reuse
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_finetune_start_reports_the_replaced_head(trained, tmp_path, capsys):
  _, workdir, _ = trained
  cfg = small_digits(8, **{"init_from.checkpoint": workdir})
  cfg.eval_modes = ("quantize",)
  train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  msg = capsys.readouterr().out
  assert "Fine-tuning from" in msg and "classifier/kernel" in msg and "classifier/bias" in msg
  assert "loaded" in msg and "stem" not in msg.split("kept fresh")[1]


# A reader of a checkpoint step without this package: orbax and numpy, in a process that never
# imports ge2mst_jax. Writes every array of the state to an .npz under its '/'-joined path.
READ_WITH_ORBAX_ALONE = """
import sys
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

step_dir, out = epath.Path(sys.argv[1]), sys.argv[2]
version = ocp.JsonCheckpointHandler().restore(step_dir / "format")["version"]
shapes = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata.tree

def as_numpy(tree):
  return {k: as_numpy(v) for k, v in tree.items()} if isinstance(tree, dict) else ocp.RestoreArgs(restore_type=np.ndarray)

def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out

state = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=as_numpy(shapes)))
np.savez(out, **flat(state))
print(version, any(m.split(".")[0] == "ge2mst_jax" for m in sys.modules))
"""


def test_a_checkpoint_reads_with_orbax_and_numpy_alone_under_readable_names(trained, tmp_path):
  _, workdir, _ = trained
  out = tmp_path / "state.npz"
  r = subprocess.run([sys.executable, "-c", READ_WITH_ORBAX_ALONE, os.path.join(workdir, "checkpoints", "8"), str(out)],
                     capture_output=True, text=True, cwd=tmp_path, timeout=300, env=cpu.env(devices=1))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["2", "False"]   # format 2; ge2mst_jax never imported
  saved = dict(np.load(out))
  model, _ = ge2mst_jax.load(workdir)
  want = saved_config.flat(jax.device_get(nnx.to_pure_dict(nnx.state(model))))
  assert {k for k in saved if k.startswith("model/")} == {f"model/{k}" for k in want}
  assert any(k.startswith("model/stages/1/") and k.endswith("/kernel") for k in saved)
  for k, v in want.items():
    np.testing.assert_array_equal(saved[f"model/{k}"], v, err_msg=k)
  assert int(saved["optimizer/step"]) == 8 and any(k.startswith("optimizer/opt_state/") for k in saved)


def _format_1_paths(pure: dict) -> dict:
  """`pure` with each attention block's paths as format 1 had them, before the block owned its
  input neuron: `<block>/neuron/...` was `<block>/attn/q/neuron/...`, `<block>/attn/q/...` was
  `<block>/attn/q/conv/...` (in the optimizer's moments too)."""
  flat = traverse_util.flatten_dict(pure)
  blocks = {k[:k.index("attn")] for k in flat if "attn" in k}

  def old(k):
    for i in range(len(k)):
      if k[:i] in blocks and k[i] == "neuron":
        return k[:i] + ("attn", "q", "neuron") + k[i + 1:]
      if k[:i] in blocks and k[i:i + 2] == ("attn", "q"):
        return k[:i] + ("attn", "q", "conv") + k[i + 2:]
    return k
  return traverse_util.unflatten_dict({old(k): v for k, v in flat.items()})


def _write_format_1(directory, step: int, state, graphdef, data_position: dict) -> None:
  """A step as checkpoints were written before the `format` item: the state positional,
  `nnx.state((model, optimizer))` (state/0 the model, state/1 the optimizer), with format 1's
  attention paths."""
  model, opt = train_state.model_and_optimizer(graphdef, state)
  mngr = ocp.CheckpointManager(directory, item_handlers={"state": ckpt_lib._state_handler(),
                                                         "data_position": ocp.JsonCheckpointHandler()})
  pure = _format_1_paths(nnx.to_pure_dict(nnx.state((model, opt))))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(pure), data_position=ocp.args.JsonSave(data_position)))
  mngr.wait_until_finished()
  mngr.close()


def test_a_format_1_checkpoint_restores_and_resumes_bit_exactly_and_stays_as_it_was(trained, tmp_path):
  cfg, workdir, out = trained
  mesh = shd.make_mesh(cfg.mesh.fsdp)   # the run's own mesh: its programs are reused
  setup = train_state.abstract_train_state(cfg, mesh)
  ckpt = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
  _, pure, position = ckpt.restore(ckpt_lib.abstract_pure(setup.abstract, setup.shardings), step=4)
  ckpt.close()
  state4 = train_state.fill(setup, pure).state
  old = tmp_path / "old"
  _write_format_1(old / "checkpoints", 4, state4, setup.graphdef, position)
  shutil.copy(os.path.join(workdir, "config.json"), old / "config.json")
  step_dir = old / "checkpoints" / "4"
  assert ckpt_lib.saved_version(step_dir) == 1
  reader = ckpt_lib.Checkpoints(old / "checkpoints", read_only=True)
  saved_paths = set(saved_config.flat(reader.saved_shapes(4)))
  reader.close()
  assert {k.split("/")[0] for k in saved_paths} == {"0", "1"}
  assert any("/attn/q/conv/" in k for k in saved_paths) and any("/attn/q/neuron/" in k for k in saved_paths)
  on_disk = lambda: {str(p): p.read_bytes() for p in sorted(step_dir.rglob("*")) if p.is_file()}
  before = on_disk()

  want = saved_config.flat(jax.device_get(nnx.to_pure_dict(state4)))
  restored, step = train_state.restore_train_state(cfg, str(old / "checkpoints"), mesh)
  got = saved_config.flat(jax.device_get(nnx.to_pure_dict(restored.state)))
  assert step == 4 and set(got) == set(want) and all(k.startswith(("model/", "optimizer/")) for k in got)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  step, as_saved = ckpt_lib.restore_as_saved(old)   # the fine-tuning source's reader
  assert step == 4 and set(as_saved) == {"model", "optimizer"}
  for k, v in saved_config.flat(as_saved).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)

  # Resumed: the run reaches the uninterrupted run's state, and writes its new step in format 2.
  resumed = train_lib.train_and_evaluate(cfg, str(old), quiet=True)
  for a, b in zip(jax.tree.leaves(jax.device_get(out["state"])), jax.tree.leaves(jax.device_get(resumed["state"]))):
    np.testing.assert_array_equal(a, b)
  assert resumed["accuracy_spike"] == out["accuracy_spike"]
  assert ckpt_lib.saved_version(old / "checkpoints" / "8") == 2
  assert on_disk() == before   # read, never moved or rewritten


def test_a_checkpoint_of_a_newer_format_is_a_one_line_error(trained, tmp_path):
  _, workdir, _ = trained
  wd = tmp_path / "newer"
  shutil.copytree(workdir, wd)
  (wd / "checkpoints" / "8" / "format" / "metadata").write_text(json.dumps({"version": 3}))   # orbax's JSON item file
  for read in (ge2mst_jax.load, ckpt_lib.restore_as_saved):
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/8 has format version 3, newer than this "
                                                       r"ge2mst_jax reads \(1 to 2\)") as err:
      read(wd)
    assert "\n" not in str(err.value)
