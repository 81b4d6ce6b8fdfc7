"""Preemption, work-directory locking and numerical faults."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ge2mst_jax import train_lib
from tests.test_train import ROOT, small_digits

CLI_SMALL = ["--config.batch_size=32", "--config.data.image_size=16", "--config.model.arch.image_size=16",
             "--config.model.arch.widths=(8,16,16,32)", "--config.model.arch.heads=(1,1,1)",
             "--config.model.arch.stem_width=8", "--config.log_every=1", "--config.eval_modes=('quantize',)",
             "--config.async_checkpoints=False"]


def _train_cli(workdir, *extra):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", workdir, *CLI_SMALL, *extra],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _logged_steps(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(l)["step"] for l in f if '"train"' in l]
  except (OSError, ValueError):
    return []


def test_sigterm_saves_the_current_step_and_the_next_start_resumes_there(tmp_path):
  wd = str(tmp_path / "wd")
  p = _train_cli(wd, "--config.total_steps=400", "--config.checkpoint_every=1000")
  deadline = time.time() + 240
  while len(_logged_steps(wd)) < 3 and time.time() < deadline and p.poll() is None:
    time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-2000:]
  line = next(l for l in out.splitlines() if "Stopped by signal 15" in l)
  step = int(line.split(" at step ")[1].split(";")[0])
  assert os.path.isdir(os.path.join(wd, "checkpoints", str(step))) and step >= 3
  assert not os.path.exists(os.path.join(wd, ".lock"))
  p = _train_cli(wd, "--config.total_steps=" + str(step + 2), "--config.checkpoint_every=1000")
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-2000:]
  assert f"Resumed from {os.path.join(wd, 'checkpoints', str(step))} at step {step}" in out


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
  os.makedirs(tmp_path, exist_ok=True)
  (tmp_path / ".lock").write_text(f"{os.uname().nodename} {os.getpid()}")   # this live process holds it
  with pytest.raises(RuntimeError, match=r"is in use by process \d+ .*wait for it, pass another --workdir"):
    train_lib.train_and_evaluate(small_digits(2), str(tmp_path), quiet=True)
  (tmp_path / ".lock").write_text(f"{os.uname().nodename} 999999999")       # a dead process: stale, taken over
  with train_lib.WorkdirLock(str(tmp_path)):
    assert (tmp_path / ".lock").read_text().split()[1] == str(os.getpid())
  assert not (tmp_path / ".lock").exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = small_digits(8, checkpoint_every=2, debug_nan_at_step=5, eval_modes=("quantize",))
  with pytest.raises(train_lib.NonFiniteError, match=r"at step 5 .*lower optimizer.lr"):
    train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["2", "4"]
  cfg = small_digits(8, checkpoint_every=0, debug_nan_at_step=5, nonfinite="skip", eval_modes=("quantize",))
  out = train_lib.train_and_evaluate(cfg, str(tmp_path / "skip"), quiet=True)
  finite = [r for r in map(json.loads, open(tmp_path / "skip" / "metrics.jsonl")) if r["kind"] == "train"]
  assert [r["finite"] for r in finite] == [1, 1, 1, 1, 0, 1, 1, 1] and out["accuracy_quantize"] >= 0

