"""Preemption, work-directory locking and numerical faults."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from ge2mst_jax.train import checkpoint as ckpt_lib
from ge2mst_jax.io import errors
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train import loop as train_lib
from tests import cpu, faults, waiting
from tests.test_train import ROOT, SHALLOW_DEPTHS, read_metrics, small_digits

pytestmark = pytest.mark.slow   # processes, buckets and long runs: the full suite only

CLI_SMALL = [  # the tests' small digits network (tests.test_train.small_digits); async saves by default
    "--config.batch_size=32", "--config.data.image_size=16", "--config.model.arch.image_size=16",
    "--config.model.arch.widths=(8,16,16,32)", "--config.model.arch.heads=(1,1,1)",
    "--config.model.arch.stem_width=8", f"--config.model.arch.depths={SHALLOW_DEPTHS}", "--config.log_every=1",
    "--config.eval_modes=('quantize',)"]


def _train_cli(workdir, *extra):
  # One CPU device, as train.py runs on a user's machine: its steps run ~1.8x faster here than
  # on the tests' eight simulated devices, and recovery does not depend on the device count.
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", workdir, *CLI_SMALL, *extra],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=cpu.env(devices=1))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "train"]


def _logged_steps(workdir):
  try:
    return [r["step"] for r in _records(workdir)]
  except (OSError, ValueError):  # not written yet, or a line cut by a kill
    return []


def _wait_for_new_step(wd, p, after: int) -> int:
  waiting.wait_until(lambda: (_logged_steps(wd) or [0])[-1] > after, [p], f"a step after {after} in {wd}",
                     lambda: waiting.activity(wd))
  return (_logged_steps(wd) or [0])[-1]


def _finish(p, wd) -> str:
  (out, err), = waiting.finish([p], f"train.py in {wd}", lambda: waiting.activity(wd))
  assert p.returncode == 0, err[-2000:]
  return out


@pytest.mark.slow
def test_sigkill_at_random_moments_and_sigterm_resume_to_the_uninterrupted_parameters(tmp_path):
  # Asynchronous saves every 4 of 40 steps: a kill lands in a step, between steps or mid-save.
  args = ["--config.total_steps=40", "--config.checkpoint_every=4", "--config.async_checkpoints=True",
          "--config.keep_checkpoints=2"]
  ref = str(tmp_path / "ref")
  _finish(_train_cli(ref, *args), ref)
  wd, rng, killed_at = str(tmp_path / "killed"), random.Random(0), []
  for _ in range(3):
    p = _train_cli(wd, *args)
    last = _logged_steps(wd)[-1] if _logged_steps(wd) else 0
    _wait_for_new_step(wd, p, last)
    time.sleep(rng.uniform(0.0, 1.0))
    p.kill()   # SIGKILL
    p.wait()
    killed_at.append(_logged_steps(wd)[-1] if _logged_steps(wd) else 0)
  assert p.returncode == -signal.SIGKILL and killed_at[-1] < 40, killed_at
  p = _train_cli(wd, *args)
  _wait_for_new_step(wd, p, killed_at[-1])
  p.send_signal(signal.SIGTERM)
  out = _finish(p, wd)
  line = next(l for l in out.splitlines() if "Stopped by signal 15" in l)
  saved = int(line.split(" at step ")[1].split(";")[0])
  assert os.path.isdir(os.path.join(wd, "checkpoints", str(saved))) and not os.path.exists(os.path.join(wd, "lease.json"))
  out = _finish(_train_cli(wd, *args), wd)
  assert f"Resumed from {os.path.join(wd, 'checkpoints', str(saved))} at step {saved}" in out
  print(f"SIGKILL after steps {killed_at}, SIGTERM saved step {saved}")
  step_ref, state_ref = ckpt_lib.restore_as_saved(ref)
  step_cut, state_cut = ckpt_lib.restore_as_saved(wd)
  assert step_ref == step_cut == 40
  for a, b in zip(jax.tree.leaves(state_ref), jax.tree.leaves(state_cut)):
    np.testing.assert_array_equal(a, b)
  # Determinism: every step the interrupted runs logged (some twice, re-run after a kill)
  # has exactly the loss of the uninterrupted run.
  ref_loss = {r["step"]: r["loss"] for r in _records(ref)}
  cut = _records(wd)
  assert len(cut) > 40 and all(r["loss"] == ref_loss[r["step"]] for r in cut)


def _nan_at_step(monkeypatch, at: int):
  """The loop's `at`-th step gets a batch of NaN images (loss and gradients NaN)."""
  nan_batch = lambda step, state, batch: step(state, dict(batch, image=batch["image"] * jnp.nan))
  faults.on_train_call(monkeypatch, at, nan_batch)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  _nan_at_step(monkeypatch, 5)
  cfg = small_digits(8, checkpoint_every=2, eval_modes=("quantize",))
  with pytest.raises(errors.NonFiniteError, match=r"at step 5 .*lower optimizer.lr"):
    train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["2", "4"]
  cfg = small_digits(8, checkpoint_every=0, nonfinite="skip", eval_modes=("quantize",))
  out = train_lib.train_and_evaluate(cfg, str(tmp_path / "skip"), quiet=True)
  finite = [r for r in map(json.loads, open(tmp_path / "skip" / "metrics.jsonl")) if r["kind"] == "train"]
  assert [r["finite"] for r in finite] == [1, 1, 1, 1, 0, 1, 1, 1]
  # The skipped step left nothing of its NaN batch: parameters, optimizer moments and BatchNorm
  # statistics are finite, and so are every later loss and the evaluation.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["state"]))
  assert all(np.isfinite(r["loss"]) for r in finite[5:]) and np.isfinite(out["accuracy_quantize"])


def test_training_falls_back_past_a_damaged_checkpoint_and_keeps_it_aside(tmp_path, caplog):
  cfg = small_digits(8, checkpoint_every=2, eval_modes=("quantize",))
  first = train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "8" / "state"):
    for name in files:
      if not name.endswith(".json"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
  again = train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert f"checkpoint {tmp_path / 'checkpoints' / '8'} is damaged" in caplog.text
  assert f"moved to {tmp_path / 'damaged_checkpoints' / '8'}" in caplog.text
  assert os.path.isdir(tmp_path / "damaged_checkpoints" / "8" / "state")   # kept, not deleted
  steps = [r["step"] for r in read_metrics(tmp_path)]
  assert steps == list(range(1, 9)) + [7, 8]                             # resumed from step 6
  for a, b in zip(jax.tree.leaves(first["state"]), jax.tree.leaves(again["state"])):
    np.testing.assert_array_equal(a, b)
  assert os.path.isdir(tmp_path / "checkpoints" / "8")


def test_a_full_disk_is_one_line_naming_the_last_complete_checkpoint_and_keeps_it(tmp_path, monkeypatch, capfd):
  # The disk fills up while step 4 is saved (the first file orbax writes into it fails with
  # ENOSPC, in its background thread as a user's async saves do); steps 1-6, saves every 2.
  path_cls, wd = type(epath.Path(tmp_path)), tmp_path / "wd"
  real_write = path_cls.write_text

  def write_text(self, *args, **kw):
    if f"checkpoints{os.sep}4." in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real_write(self, *args, **kw)

  cfg = small_digits(6, checkpoint_every=2, async_checkpoints=True, eval_modes=("quantize",))
  with monkeypatch.context() as patch:
    patch.setattr(path_cls, "write_text", write_text)
    with pytest.raises(errors.CheckpointWriteError) as err:
      train_lib.train_and_evaluate(cfg, str(wd), quiet=True)
  msg = str(err.value)
  assert "\n" not in msg and "Traceback" not in capfd.readouterr().err
  assert msg == (f"Could not write a checkpoint to {wd / 'checkpoints'} ([Errno 28] No space left on device); the "
                 f"last complete checkpoint is {wd / 'checkpoints' / '2'} (step 2): free space there or pass another "
                 f"--workdir (copy the checkpoints over to keep them), then run the same command to resume from it.")
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "best"]            # no temporary step 4 left
  assert all(".orbax-checkpoint-tmp" not in n for n in os.listdir(wd / "checkpoints" / "best"))
  # Space again: the same command resumes from step 2 and takes each later step once.
  train_lib.train_and_evaluate(cfg, str(wd), quiet=True)
  steps = [r["step"] for r in read_metrics(wd)]
  assert steps == [1, 2, 3, 4, 5, 6] + [3, 4, 5, 6], steps   # the failed save came to light at step 6


def test_a_save_on_eight_devices_compiles_nothing_and_restores_exactly(tmp_path, monkeypatch):
  """Replicated arrays are written from one replica, not sliced among the 8 on the devices first
  (orbax's default: one eager slice program per array shape and replica)."""
  slices = []
  real = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a[0].shape) or real(*a, **k))
  replicated = jax.sharding.NamedSharding(shd.make_mesh(1), jax.sharding.PartitionSpec())
  pure = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones(3, jnp.bfloat16), "step": jnp.int32(7)}
  pure = jax.device_put(pure, replicated)
  ckpt = ckpt_lib.Checkpoints(tmp_path, async_save=False)
  ckpt.save(7, nnx.State(pure), {"records_per_process": 5})
  ckpt.wait()
  assert slices == []
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), pure)
  step, restored, position = ckpt.restore(target)
  ckpt.close()
  assert step == 7 and position == {"records_per_process": 5}
  for k, v in pure.items():
    assert restored[k].dtype == v.dtype and restored[k].sharding.is_equivalent_to(replicated, v.ndim)
    np.testing.assert_array_equal(restored[k], v)
  assert ckpt_lib.restore_as_saved(tmp_path)[0] == 7   # orbax's standard reader reads these files


BAD_INPUTS = [
    ({"batch_size": 30}, r"batch_size=30 is not divisible by the 8 devices: use a multiple of 8"),
    ({"data.name": "nosuch"}, r"Unknown data set 'nosuch'.*check data.name"),
    ({"model.arch.T": 0}, r"T=0 is out of range: use an integer 1 <= T <= 16"),
    ({"model.arch.K": 5}, r"K=5 is out of range for T=4: use an integer 1 <= K <= T"),
    ({"model.arch.gw_strides": (3, 2)}, r"Stage 2 \(8x8 tokens.*stride s=3 does not divide"),
    ({"model.arch.paradigm": "bptt"}, r"paradigm='bptt': use one of \('expg', 'stbp'\)"),
    ({"nonfinite": "ignore"}, r"nonfinite='ignore': use 'stop' or 'skip'"),
    ({"total_steps": 0}, r"total_steps=0 must be >= 1"),
    ({"alpha.kind": "exp"}, r"Unknown alpha schedule 'exp': use 'linear', 'cosine', 'poly' or 'constant'"),
    ({"alpha.ramp_end": 1.5}, r"alpha ramp_end=1.5 is outside \(0, 1\]: set it to the fraction of total_steps"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[next(iter(o)) for o, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error_before_anything_is_written(tmp_path, override, message):
  cfg = small_digits(2, **override)
  with pytest.raises(ValueError, match=message) as err:
    train_lib.train_and_evaluate(cfg, str(tmp_path / "wd"), quiet=True)
  assert "\n" not in str(err.value)
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/imagenet2012.py:huge"], "Unknown model 'ge2mst_huge': choose one of"),
    (["--config", "configs/nosuch.py"], "cannot load the config file: .*No such file or directory"),
    (["--config.model.arch.K=9"], "K=9 is out of range for T=4"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(tmp_path / "wd"), *args],
                     capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and re.search(message, lines[0]), r.stderr[-2000:]
  assert not (tmp_path / "wd").exists()
