"""A work directory in a bucket: train, checkpoint, write metrics, resume, fall back past a
damaged step, evaluate and export with `gs://` paths, against a local GCS emulator
(`gcp-storage-emulator`, started here; nothing leaves localhost)."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from ge2mst_jax.evaluate import report as evaluation
from ge2mst_jax.io import paths
from ge2mst_jax.train import run_control
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train import loop as train_lib
from ge2mst_jax.weights import export, load
from tests import faults
from tests.test_models import both_modes
from tests.test_train import small_digits

pytestmark = pytest.mark.slow   # processes, buckets and long runs: the full suite only

BUCKET = "ge2mst-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS emulator on a free localhost port, with every client's emulator variables set."""
  import portpicker
  port = portpicker.pick_unused_port()
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  server = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET], stdout=log, stderr=log,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  deadline = time.time() + 120
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, "the GCS emulator did not start"
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url,                 # gcsfs (epath) and google-cloud-storage (tensorboardX)
         "TENSORSTORE_GCS_HTTP_URL": url,              # tensorstore, under orbax
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # its bucket-type probe speaks gRPC, which emulators do not
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield f"gs://{BUCKET}"
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.terminate()
  server.wait(timeout=30)
  log.close()


def _metrics(wd):
  return [json.loads(l) for l in (epath.Path(wd) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.xdist_group("trained_digits")   # test_eval's worker: its programs compile once for both
def test_a_run_lives_in_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # anything written locally by mistake would land here
  wd = f"{gcs}/runs/digits"
  cfg = small_digits(8, checkpoint_every=2, eval_modes=("quantize", "spike"))
  root = epath.Path(wd)
  with monkeypatch.context() as patch:   # the run dies in its 5th step, after the step-4 checkpoint
    faults.on_train_call(patch, 5, faults.interrupt)
    with pytest.raises(KeyboardInterrupt):
      train_lib.train_and_evaluate(cfg, wd, quiet=True)
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]
  assert [r["step"] for r in _metrics(wd) if r["kind"] == "train"] == [1, 2, 3, 4]
  assert json.loads((root / "config.json").read_text())["total_steps"] == 8
  assert not (root / run_control.LEASE_FILE).exists() and os.listdir(tmp_path) == []

  # The same command, after damaging step 4: the run falls back to step 2, moves step 4 aside
  # and finishes.
  state_dir = root / "checkpoints" / "4" / "state"
  data_files = [f for f in paths.files(state_dir) if f.parent.name == "d"]   # OCDBT data files
  victim = max(data_files, key=lambda p: p.stat().length)
  victim.write_bytes(victim.read_bytes()[:16])
  again = train_lib.train_and_evaluate(cfg, wd, quiet=True)
  assert again["workdir"] == wd and (root / "damaged_checkpoints" / "4" / "state").is_dir()
  steps = [r["step"] for r in _metrics(wd) if r["kind"] == "train"]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]     # the bucket's metrics.jsonl keeps both runs' records
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["4", "6", "8", "best"]
  assert json.loads((root / "summary.json").read_text())["accuracy_spike"] == again["accuracy_spike"]
  assert any(p.name.startswith("events.out.tfevents") for p in (root / "tb").iterdir())
  assert not (root / run_control.LEASE_FILE).exists() and os.listdir(tmp_path) == []

  # Evaluate and export from the bucket, into the bucket. (16 energy images and both modes on 4
  # images below: test_eval's programs, compiled once for both files.)
  rep = evaluation.evaluate_checkpoint(cfg, root / "checkpoints", energy_images=16)
  assert rep["step"] == 8 and rep["accuracy_spike"] == again["accuracy_spike"]
  files = evaluation.write_report(rep, root / "eval")
  assert files["json"] == f"{wd}/eval/report.json" and (root / "eval" / "sops.png").exists()
  out = export(wd, f"{wd}/export/digits.safetensors")
  model_a, _ = load(wd)
  model_b, cfg_b = load(out)
  assert cfg_b.total_steps == 8
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  for a, b in zip(both_modes(model_a, images), both_modes(model_b, images)):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path) == []


def test_a_bucket_lease_refuses_a_live_run_and_yields_to_a_dead_one(gcs):
  wd = epath.Path(f"{gcs}/runs/leased")
  wd.mkdir(parents=True, exist_ok=True)
  lease = wd / run_control.LEASE_FILE
  lease.write_text(json.dumps({"owner": "other-host-run", "host": "node-7", "pid": 1, "heartbeat": time.time()}))
  with pytest.raises(run_control.LeaseHeldError, match="in use by another run .owner other-host-run"):
    train_lib.train_and_evaluate(small_digits(2), str(wd), quiet=True)
  assert [p.name for p in wd.iterdir()] == [run_control.LEASE_FILE]
  lease.write_text(json.dumps({"owner": "other-host-run", "host": "node-7", "pid": 1, "heartbeat": time.time() - 3600}))
  with run_control.Lease(wd) as mine:
    assert json.loads(lease.read_text())["owner"] == mine.owner
  assert not lease.exists()


def test_a_missing_bucket_is_one_line_before_anything_is_written(gcs):
  with pytest.raises(RuntimeError, match=r"Cannot use the work directory gs://no-such-bucket/run: FileNotFoundError: "
                                         r"bucket gs://no-such-bucket does not exist\. Check the path") as err:
    train_lib.train_and_evaluate(small_digits(2), "gs://no-such-bucket/run", quiet=True)
  assert "\n" not in str(err.value)
  assert not epath.Path(f"{gcs}/run").exists()


def test_a_data_dir_in_a_bucket_says_to_mount_it():
  cfg = small_digits(2)
  cfg.data.name, cfg.data.data_dir = "cifar10", "gs://bucket/tfds"
  with pytest.raises(ValueError, match=r"data.data_dir=gs://bucket/tfds: ArrayRecord files are read from a local "
                                       r"path only; mount the bucket .*gcsfuse") as err:
    train_lib.validate_config(cfg, shd.make_mesh(1))
  assert "\n" not in str(err.value)
