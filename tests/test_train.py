"""Training: a short digits run, 8-device sharding, two processes, resume, errors, tfds."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import cifar10, digits, imagenet2012
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.io import saved_config
from ge2mst_jax.io.errors import CheckpointError
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train import loop as train_lib
from ge2mst_jax.train import state as train_state
from tests import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Stage 1's block and Stage 2's GW-SSA block; stages 3 and 4 only downsample. The tests of training,
# evaluation, checkpoints and pods run this depth: their programs compile in half the time of depths
# (1, 1, 1, 1) (train step 9.2 s vs 19.0 s on one core). The full network's layers are test_models'.
SHALLOW_DEPTHS = (1, 1, 0, 0)


def small_digits(steps=12, small_net=True, **kw):
  cfg = digits.get_config(f"steps={steps}")
  cfg.batch_size, cfg.eval_batch_size = 32, 120
  cfg.log_every, cfg.checkpoint_every = 1, 0
  cfg.optimizer.warmup_steps = 2
  cfg.async_checkpoints = False
  cfg.watchdog_secs = 0  # off in tests unless a test asks for it
  if small_net:  # a smaller image and network than the default tiny: cheaper steps
    cfg.data.image_size = cfg.model.arch.image_size = 16
    cfg.model.arch.widths, cfg.model.arch.heads = (8, 16, 16, 32), (1, 1, 1)
    cfg.model.arch.stem_width = 8
    cfg.model.arch.depths = SHALLOW_DEPTHS
  for k, v in kw.items():
    node = cfg
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return cfg


def read_metrics(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def cross_device_ops(fn, *args) -> list[str]:
  """The collectives of `fn`'s compiled program for `args` that move activations between devices
  (all-gathers, all-to-alls, permutes): a data-parallel step has none; all-reduces are its sums."""
  hlo = fn.lower(*args).compile().as_text()
  return [op for op in ("all-gather", "collective-permute", "all-to-all") if f" {op}(" in hlo or f" {op}-start(" in hlo]


def params_of(state):
  return jax.device_get(nnx.to_pure_dict(state)["model"])


@pytest.mark.slow
def test_short_digits_run_learns_and_evaluates_both_modes(tmp_path):
  # The tiny network's widths and image size (the learning rate is tuned to them), shallow.
  cfg = small_digits(40, small_net=False, **{"optimizer.lr": 0.2, "model.arch.depths": SHALLOW_DEPTHS})
  out = train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  losses = [r["loss"] for r in read_metrics(tmp_path)]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
  assert {"accuracy_quantize", "accuracy_spike", "prediction_agreement"} <= set(out)
  assert out["examples"] == 360 and out["accuracy_spike"] > 0.3
  alphas = [r["alpha"] for r in read_metrics(tmp_path)]
  assert alphas[0] == 0 and alphas[-1] == 1.0 and np.all(np.diff(alphas) >= 0)
  assert os.path.isdir(tmp_path / "tb") and os.path.exists(tmp_path / "summary.json")


def _run_steps(cfg, mesh, batches):
  setup = train_state.create_train_state(cfg, mesh)
  step = train_lib.make_train_step(cfg, setup)
  state, losses = setup.state, []
  for b in batches:
    state, m = step(state, shd.global_batch(b, mesh))
    losses.append(float(m["loss"]))
  return setup, state, losses


@pytest.mark.slow
def test_eight_devices_match_one_device_and_shard_parameters():
  assert jax.device_count() == 8
  # Early in a long run alpha is ~0: the activation is (nearly) ClipReLU, so the comparison
  # sees the sharding, not quantizer levels flipping on last-bit reduction-order differences.
  # SGD: Adam's first steps are sign(g), which turns last-bit reduction-order noise on
  # gradients that are zero in exact arithmetic (BN biases) into full learning-rate steps.
  cfg = small_digits(1000, small_net=False, **{"optimizer.name": "sgd", "optimizer.lr": 0.05,
                                                "model.arch.depths": SHALLOW_DEPTHS})   # shardable widths
  cfg.mesh.fsdp = 4
  it = iter(data_lib.train_dataset(cfg.data, cfg.batch_size, cfg.seed))
  batches = [next(it) for _ in range(3)]
  _, s1, l1 = _run_steps(cfg, shd.make_mesh(1, jax.devices()[:1]), batches)
  setup8, s8, l8 = _run_steps(cfg, shd.make_mesh(4), batches)
  print(f"losses 1 device {l1} / 8 devices {l8}")
  # The first loss is the same function of the same parameters: float tolerance. Later steps
  # see gradients summed in another order; in a quantized net a last-bit difference can move
  # an activation across a level, so the trajectories agree to a percent, not to the bit.
  np.testing.assert_allclose(l8[0], l1[0], rtol=2e-5)
  np.testing.assert_allclose(l8, l1, rtol=2e-2)
  flat = dict(jax.tree_util.tree_leaves_with_path(s8))
  kernel = next(v for p, v in flat.items() if "stages" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)
                and v.shape[-1] % 4 == 0 and v.size >= shd.MIN_SHARD_SIZE)
  assert kernel.sharding.spec[-1] == "fsdp" and len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 4
  lam = next(v for p, v in flat.items() if jax.tree_util.keystr(p).endswith("['lam'].value"))
  assert lam.sharding.is_fully_replicated


def test_resume_reaches_the_same_parameters_on_any_mesh(tmp_path, monkeypatch):
  cfg = small_digits(8, checkpoint_every=4)
  cfg.eval_modes = ("quantize",)
  full = train_lib.train_and_evaluate(cfg, str(tmp_path / "full"), quiet=True)

  with monkeypatch.context() as patch:   # preempted after the step-4 checkpoint, mid-way to the next one
    faults.on_train_call(patch, 6, faults.interrupt)
    with pytest.raises(KeyboardInterrupt):
      train_lib.train_and_evaluate(cfg, str(tmp_path / "cut"), quiet=True)

  def no_init(*_):
    raise AssertionError("a restore computed a fresh state first")
  monkeypatch.setattr(train_lib, "initialize", no_init)   # a restore reads straight into the shardings
  resumed = train_lib.train_and_evaluate(cfg, str(tmp_path / "cut"), quiet=True)
  for a, b in zip(jax.tree.leaves(params_of(full["state"])), jax.tree.leaves(params_of(resumed["state"]))):
    np.testing.assert_array_equal(a, b)
  full_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
  cut_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut")}
  assert all(cut_losses[s] == full_losses[s] for s in range(5, 9))
  assert full["accuracy_quantize"] == resumed["accuracy_quantize"]
  # the same checkpoint restores onto another mesh: 8 devices, parameters sharded 8 ways
  cfg.mesh.fsdp = 8
  setup, step = train_state.restore_train_state(cfg, str(tmp_path / "cut" / "checkpoints"), shd.make_mesh(8))
  assert step == 8
  sharded = [x for x in jax.tree.leaves(setup.state) if not x.sharding.is_fully_replicated]
  assert sharded and all(x.addressable_shards[0].data.size * 8 == x.size for x in sharded)
  for a, b in zip(jax.tree.leaves(params_of(resumed["state"])), jax.tree.leaves(params_of(setup.state))):
    np.testing.assert_array_equal(a, b)


def run_cli(*args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_config_errors_are_one_line():
  r = run_cli("--config.optimizer.lrr=1")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "unknown config key 'config.optimizer.lrr'" in last and 'Did you mean "lr"' in last
  r = run_cli("--config.batch_size=abc")
  assert r.returncode != 0 and "--config.batch_size=abc" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override,other", [
    ("--config.data.image_size=48", "model.arch.image_size"),
    ("--config.model.arch.image_size=48", "data.image_size"),
])
def test_an_override_of_a_shared_field_sets_both_places(override, other, monkeypatch):
  """data/model.arch image_size and event_frames are one FieldReference each: a config_flags
  override (on a locked config, as train.py defines it) of either sets both, also after the
  config has been saved as JSON and read back."""
  argv = ["train.py", override, "--config.model.arch.event_frames=6"]
  monkeypatch.setattr(sys, "argv", argv)   # config_flags defines the override flags from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "cifar10_dvs.py:tiny"), flag_values=fv,
                                  lock_config=True)
  fv(argv)
  cfg = fv.config
  assert cfg.data.image_size == cfg.model.arch.image_size == 48
  assert cfg.data.event_frames == cfg.model.arch.event_frames == 6
  with pytest.raises(AttributeError):
    cfg.data.imagesize = 48   # still locked
  read = saved_config.from_json(cfg.to_json())
  assert saved_config.diff(read, cfg) == [] and read.to_json() == cfg.to_json()
  node = read
  *path, last = other.split(".")
  for p in path:
    node = node[p]
  node[last] = 64
  assert read.data.image_size == read.model.arch.image_size == 64


def test_a_saved_config_whose_shared_fields_disagree_is_a_clear_error():
  cfg = json.loads(digits.get_config().to_json())
  cfg["model"]["arch"]["image_size"] = 16
  with pytest.raises(CheckpointError, match=r"data.image_size=32 but model.arch.image_size=16; .*make them equal"):
    saved_config.from_json(json.dumps(cfg))


def test_mesh_must_divide_the_devices():
  with pytest.raises(ValueError, match="mesh.fsdp=3 does not divide the 8 devices"):
    shd.make_mesh(3)


def test_missing_dataset_says_how_to_prepare(tmp_path):
  cfg = cifar10.get_config("tiny")
  cfg.data.data_dir = str(tmp_path)
  with pytest.raises(data_lib.DataError, match=r"not prepared as ArrayRecord in .*tfds build cifar10"):
    data_lib.train_dataset(cfg.data, 8, 0)


def test_digits_split_is_the_stratified_split_read_without_scikit_learn():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  train, test = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
  for split, idx in (("train", train), ("test", test)):
    src = data_lib.digits_source(split, image_size=8)
    np.testing.assert_array_equal(src.labels, d.target[idx])
    np.testing.assert_array_equal(src.images[..., 1], (d.images[idx] / 16 * 255).round())
  code = "import sys; from ge2mst_jax.data import pipeline; pipeline.digits_source('train'); print('sklearn' in sys.modules)"
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr[-2000:]


def test_digits_without_scikit_learn_is_a_one_line_error(monkeypatch):
  monkeypatch.setattr(data_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(data_lib.DataError, match=r"ships with scikit-learn .*pip install scikit-learn") as err:
    data_lib.digits_source("train")
  assert "\n" not in str(err.value)


@pytest.mark.slow
def test_tfds_cifar10_pipeline_and_training_on_mock_data(tmp_path):
  cfg = cifar10.get_config("tiny")
  cfg.batch_size, cfg.eval_batch_size, cfg.total_steps = 16, 16, 2
  cfg.log_every, cfg.checkpoint_every, cfg.async_checkpoints = 1, 0, False
  cfg.eval_modes = ("quantize",)
  cfg.model.arch.depths = SHALLOW_DEPTHS   # the pipeline under test, not the network
  with tfds.testing.mock_data(num_examples=40):
    b = next(iter(data_lib.train_dataset(cfg.data, 16, 0)))
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32 and b["label"].shape == (16,)
    out = train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
    # The evaluator's accuracy is the model's, recounted here image by image on the mock test split.
    model, _ = train_state.model_and_optimizer(out["setup"].graphdef, out["state"])
    model.eval()
    predict = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))
    hits = [(np.asarray(predict(model, b["image"])) == b["label"])[b["mask"]] for b in data_lib.eval_batches(cfg.data, 16)]
  assert out["examples"] == 40 == sum(len(h) for h in hits)
  assert out["accuracy_quantize"] == pytest.approx(np.concatenate(hits).mean(), abs=1e-12)


def test_tfds_imagenet_pipeline_shapes_on_mock_data():
  cfg = imagenet2012.get_config("small")
  cfg.data.workers = 0
  # tfds' mock data cannot hand over encoded images without TensorFlow (it encodes them with it):
  # here tfds decodes; tests/test_jpeg_records.py reads real JPEG records as ImageNet is read.
  cfg.data.decode_in_workers = False
  with tfds.testing.mock_data(num_examples=24):
    b = next(iter(data_lib.train_dataset(cfg.data, 8, 0)))
    e = next(data_lib.eval_batches(cfg.data, 8))
  assert b["image"].shape == (8, 224, 224, 3) and e["image"].shape == (8, 224, 224, 3)
  assert b["label"].max() < 1000 and e["mask"].all()
  assert np.isfinite(b["image"]).all() and abs(float(b["image"].mean())) < 3


@pytest.mark.slow
def test_a_profile_of_two_steps_lands_in_the_work_directory_per_host(tmp_path):
  cfg = small_digits(8, eval_modes=("quantize",), **{"profile.after": 2, "profile.steps": 2})
  out = train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  traces = list((tmp_path / "profile" / "host_0" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0 and out["examples"] == 360
  assert len(read_metrics(tmp_path)) == 8
  with pytest.raises(ValueError, match=r"profile.steps=-1 .* must be >= 0"):
    train_lib.train_and_evaluate(small_digits(8, **{"profile.steps": -1}), str(tmp_path / "bad"), quiet=True)
