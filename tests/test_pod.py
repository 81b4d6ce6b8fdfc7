"""Pod conditions on one machine: several hosts (CPU processes over localhost), preemption of
one host, restore on another host count, the work-directory lease, the watchdog, restores that
refuse an incompatible config, and pod-size config arithmetic."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet2012
from ge2mst_jax.train import checkpoint as ckpt_lib
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.train import mixing
from ge2mst_jax.train import run_control
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train import loop as train_lib
from tests import cpu, waiting
from tests.test_train import ROOT, cross_device_ops, read_metrics, small_digits

STEPS = 8   # the tests' common run length: one compiled train step serves most of them


def _logged_steps(workdir) -> list[int]:
  try:
    return [r["step"] for r in read_metrics(workdir)]
  except (OSError, ValueError):  # not written yet, or a line being written
    return []


def _start_hosts(n: int, workdir, *overrides):
  import portpicker
  port = str(portpicker.pick_unused_port())
  env = cpu.env(devices=1)
  # Quantize-mode evaluation only: spike-mode equality is tested elsewhere, and its compile
  # would double every host's start-up here.
  return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(n), port, str(workdir),
                            f"total_steps={STEPS}", "eval_modes=('quantize',)", *overrides],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(n)]


def _finish(procs, workdir) -> list[dict]:
  """Every host's JSON line, once all have ended; fails only if the run stops making progress."""
  outs = waiting.finish(procs, f"the hosts training in {workdir}", lambda: waiting.activity(workdir))
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


@pytest.mark.slow
def test_sigterm_to_one_host_saves_one_step_everywhere_and_restores_on_any_host_count(tmp_path):
  # The uninterrupted two-host run: both hosts end with the same parameters, each read its own shard.
  ref = _finish(_start_hosts(2, tmp_path / "ref"), tmp_path / "ref")
  assert {r["pid"] for r in ref} == {0, 1} and all(r["n"] == 2 for r in ref)
  assert ref[0]["digest"] == ref[1]["digest"] and ref[0]["accuracy_quantize"] == ref[1]["accuracy_quantize"]

  # SIGTERM to one host, chosen at random, at a random step: both hosts save the same step and exit.
  rng = random.Random(int(time.time()))
  victim, at = rng.randrange(2), rng.randrange(2, STEPS - 3)
  cut = tmp_path / "cut"
  procs = _start_hosts(2, cut)
  waiting.wait_until(lambda: _logged_steps(cut) and _logged_steps(cut)[-1] >= at, procs, f"step {at}",
                     lambda: waiting.activity(cut))
  procs[victim].send_signal(signal.SIGTERM)
  stopped = _finish(procs, cut)
  saved = {r["preempted_at"] for r in stopped}
  print(f"SIGTERM to host {victim} after step {at}: both saved step {saved} and exited")
  assert len(saved) == 1
  step = saved.pop()
  assert at <= step < STEPS
  assert (cut / "checkpoints" / str(step) / "commit_success.txt").exists()
  assert not (cut / run_control.LEASE_FILE).exists()
  shutil.copytree(cut, tmp_path / "cut_on_1")
  shutil.copytree(cut, tmp_path / "cut_on_4")

  # The same command again: the pair finishes with the uninterrupted run's final state and metrics.
  resumed = _finish(_start_hosts(2, cut), cut)
  assert [r["digest"] for r in resumed] == [r["digest"] for r in ref]
  assert resumed[0]["accuracy_quantize"] == ref[0]["accuracy_quantize"] and resumed[0]["examples"] == 360
  ref_loss = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref")}
  assert all(r["loss"] == ref_loss[r["step"]] for r in read_metrics(cut))

  # The two-host checkpoint restores on four hosts and on one (eight devices): the data position
  # continues at the saved global epoch and example count.
  saved_epoch = next(r["epoch"] for r in read_metrics(cut) if r["step"] == step)
  n_train, batch = data_lib.num_examples(small_digits().data, "train"), small_digits().batch_size
  four = _finish(_start_hosts(4, tmp_path / "cut_on_4"), tmp_path / "cut_on_4")
  assert all(r["n"] == 4 for r in four) and len({r["digest"] for r in four}) == 1
  one = train_lib.train_and_evaluate(small_digits(STEPS, eval_modes=("quantize",)), str(tmp_path / "cut_on_1"),
                                     quiet=True)
  for wd in ("cut_on_4", "cut_on_1"):
    recs = [r for r in read_metrics(tmp_path / wd) if r["step"] > step]   # the resumed run's records
    assert [r["step"] for r in recs] == list(range(step + 1, STEPS + 1)), wd
    assert abs(recs[0]["epoch"] - (saved_epoch + batch / n_train)) < 4 / n_train, wd
  assert one["examples"] == 360 and np.isfinite(one["accuracy_quantize"])


def test_data_position_across_host_counts(monkeypatch):
  # 2 hosts, 718 records each; 1000 records read by each: epoch 1, 282 records into it on each host,
  # 564 examples of the global epoch.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  saved = data_lib.data_position(1000, 1437)
  assert saved == {"records_per_process": 1000, "process_count": 2, "shard_size": 718, "epoch": 1,
                   "examples_seen": 2000}
  assert data_lib.resume_records(saved, 1437, 0) == 1000                # same host count: exact
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  assert data_lib.resume_records(saved, 1437, 0) == 359 + 564 // 4      # epoch 1 of 359-record shards
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  assert data_lib.resume_records(saved, 1437, 0) == 1437 + 564
  assert data_lib.resume_records(None, 1437, 96) == 96                  # an old checkpoint: step x batch


def test_a_resumed_stream_is_the_uninterrupted_stream():
  cfg = small_digits().data
  full = iter(data_lib.train_dataset(cfg, 32, 0))
  batches = [next(full) for _ in range(3)]
  resumed = next(iter(data_lib.train_dataset(cfg, 32, 0, start=2 * 32)))
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  np.testing.assert_array_equal(resumed["label"], batches[2]["label"])


# ----------------------------------------------------------------------------
# The lease
# ----------------------------------------------------------------------------
def _lease_record(owner, age):
  return json.dumps({"owner": owner, "host": "other-node", "pid": 1, "heartbeat": time.time() - age})


def test_a_fresh_lease_refuses_the_run_and_a_stale_one_is_taken_over(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  lease = wd / run_control.LEASE_FILE
  lease.write_text(_lease_record("other-run", age=5))   # another node's run, alive: pid 1 in its container
  cfg = small_digits(2)
  with pytest.raises(run_control.LeaseHeldError, match=r"in use by another run \(owner other-run, process 1 on "
                     r"other-node, heartbeat \d+ s ago\): wait for it, pass another --workdir") as err:
    train_lib.train_and_evaluate(cfg, str(wd), quiet=True)
  assert "\n" not in str(err.value)
  assert sorted(os.listdir(wd)) == [run_control.LEASE_FILE] and "other-run" in lease.read_text()

  lease.write_text(_lease_record("other-run", age=cfg.lease.timeout_secs + 1))   # its node was preempted
  with run_control.Lease(wd, cfg.lease.timeout_secs, heartbeat_secs=0.1) as mine:
    assert json.loads(lease.read_text())["owner"] == mine.owner
    first = json.loads(lease.read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads(lease.read_text())["heartbeat"] > first          # the heartbeat moves
  assert not lease.exists()                                            # released


def test_a_killed_run_on_this_machine_does_not_block_a_restart(tmp_path):
  lease = tmp_path / run_control.LEASE_FILE
  lease.write_text(json.dumps({"owner": "killed", "host": os.uname().nodename, "pid": 999999999,
                               "heartbeat": time.time()}))       # SIGKILLed a moment ago
  with run_control.Lease(tmp_path) as mine:
    assert json.loads(lease.read_text())["owner"] == mine.owner
  lease.write_text(json.dumps({"owner": "alive", "host": os.uname().nodename, "pid": os.getppid(),
                               "heartbeat": time.time()}))
  with pytest.raises(run_control.LeaseHeldError):
    run_control.Lease(tmp_path).acquire()


def test_a_requeued_job_takes_its_own_lease_back(tmp_path, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  (tmp_path / run_control.LEASE_FILE).write_text(_lease_record("job-4242", age=1))
  with run_control.Lease(tmp_path) as lease:
    assert lease.owner == "job-4242"


def test_a_lease_lost_to_another_run_is_noticed(tmp_path):
  with run_control.Lease(tmp_path, heartbeat_secs=0.05) as lease:
    (tmp_path / run_control.LEASE_FILE).write_text(_lease_record("intruder", age=0))
    deadline = time.time() + 30
    while lease.lost_to is None and time.time() < deadline:
      time.sleep(0.02)
    assert lease.lost_to == "intruder"
  assert "intruder" in (tmp_path / run_control.LEASE_FILE).read_text()   # not ours to delete


# ----------------------------------------------------------------------------
# The watchdog
# ----------------------------------------------------------------------------
def test_watchdog_fires_only_after_progress_stops():
  fired = []
  with run_control.Watchdog(0.4, exit_fn=fired.append) as dog:
    time.sleep(0.6)
    assert not fired                      # not armed before the first step (compiles)
    for step in range(1, 6):
      dog.beat(step)
      time.sleep(0.1)
    with dog.held("compile", 5):          # a compile longer than the timeout
      time.sleep(0.8)
    assert not fired and dog.phase == "train"
    time.sleep(0.2)
    assert not fired                      # the clock started again when the compile ended
    with dog.in_phase("checkpoint", 5):      # a save has the whole timeout of its own
      time.sleep(0.3)
      assert dog.phase == "checkpoint"
    time.sleep(0.3)
    assert not fired
    stalled = time.monotonic()
    while not fired and time.monotonic() - stalled < 5:
      time.sleep(0.01)
  assert fired == [run_control.EXIT_STALLED]
  assert time.monotonic() - stalled < 0.4   # at the deadline, not a polling interval after it


def test_steps_beat_when_their_results_are_ready_not_when_dispatched():
  outputs, beats = {}, []
  dog = run_control.Watchdog(0)
  dog.beat = lambda step, phase="train": beats.append((step, outputs[step].is_ready()))
  in_flight = run_control.InFlight(dog, depth=2)
  slow = jax.jit(lambda x: jax.lax.fori_loop(0, 50, lambda i, y: jnp.tanh(y @ y.T), x))
  for step in range(1, 6):
    outputs[step] = slow(jnp.full((128, 128), step / 1e3))
    in_flight.push(step, outputs[step])
    assert beats == [(s, True) for s in range(1, step - 1)]   # two steps in flight, no more
  in_flight.drain()
  assert beats == [(s, True) for s in range(1, 6)]


WATCHDOG_SECS = 10.0


@pytest.mark.slow
def test_a_tight_watchdog_never_fires_on_a_cold_pair_and_catches_a_frozen_host(tmp_path):
  # Steps take ~0.1 s; a step's call returns at once, so the host could otherwise run far ahead
  # of the computation (log_every is large), and the cold compiles of the step and of the
  # mid-run evaluation take longer than the timeout on this machine. None of it may fire.
  wd = tmp_path / "wd"
  procs = _start_hosts(2, wd, "total_steps=400", f"watchdog_secs={WATCHDOG_SECS}", "log_every=20",
                       "eval_every=20", "checkpoint_every=40")
  waiting.wait_until(lambda: (_logged_steps(wd) or [0])[-1] >= 60, procs, "step 60", lambda: waiting.activity(wd))
  assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
  evals = [r["step"] for r in read_metrics(wd, "eval")]
  assert evals[:2] == [20, 40]
  step_secs = 20 * 32 / read_metrics(wd)[-1]["images_per_sec"]   # one step, from the last 20
  # Host 1 freezes (SIGSTOP: a hung VM, a stuck driver); host 0 waits in its collectives and exits.
  procs[1].send_signal(signal.SIGSTOP)
  frozen = time.monotonic()
  try:
    (_, err), = waiting.finish(procs[:1], "host 0's watchdog", lambda: waiting.activity(wd))
    detected = time.monotonic() - frozen
  finally:
    procs[1].kill()
    procs[1].communicate()
  print(f"host 1 frozen after step >= 60: host 0 exited after {detected:.1f} s "
        f"(watchdog_secs={WATCHDOG_SECS:g}, one step {step_secs:.2f} s)")
  assert procs[0].returncode == run_control.EXIT_STALLED, err[-3000:]
  assert f"watchdog: process 0 on " in err and f"no progress for {WATCHDOG_SECS:g} s after " in err
  assert WATCHDOG_SECS - 1 < detected < WATCHDOG_SECS + step_secs + 2.0   # + process exit and polling


# ----------------------------------------------------------------------------
# Restores that must not quarantine, configs that must not be written
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_an_edited_config_is_refused_naming_the_keys_and_nothing_moves(tmp_path):
  cfg = small_digits(8, checkpoint_every=4, eval_modes=("quantize",))
  train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  saved_config = (tmp_path / "config.json").read_text()
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  edited = small_digits(8, checkpoint_every=4, eval_modes=("quantize",), **{"model.arch.stem_width": 12})
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as err:
    train_lib.train_and_evaluate(edited, str(tmp_path), quiet=True)
  msg = str(err.value)
  assert "\n" not in msg and "was written for a different model" in msg
  assert "(3, 3, 8, 8) saved, (3, 3, 12, 8) now" in msg and "model.arch.stem_width: 8 -> 12" in msg
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before and not (tmp_path / "damaged_checkpoints").exists()
  assert (tmp_path / "config.json").read_text() == saved_config


@pytest.mark.slow
def test_a_bad_override_on_an_existing_run_writes_nothing(tmp_path):
  cfg = small_digits(8, eval_modes=("quantize",))
  train_lib.train_and_evaluate(cfg, str(tmp_path), quiet=True)
  saved_config = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match="batch_size=-8 is not divisible|batch_size=-8 must be >= 1"):
    train_lib.train_and_evaluate(small_digits(8, batch_size=-8), str(tmp_path), quiet=True)
  assert (tmp_path / "config.json").read_text() == saved_config


# ----------------------------------------------------------------------------
# Pod-size arithmetic and the mixing partners
# ----------------------------------------------------------------------------
def test_any_eval_batch_size_is_padded_to_the_devices_and_masked(tmp_path):
  cfg = small_digits(1).data
  batches = list(data_lib.eval_batches(cfg, 250, num_devices=8))
  assert {b["image"].shape[0] for b in batches} == {256}
  assert sum(int(b["mask"].sum()) for b in batches) == 360
  assert data_lib.eval_batch_shape(250, 16) == 256 and data_lib.eval_batch_shape(250, 5) == 250
  out = train_lib.train_and_evaluate(small_digits(8, eval_batch_size=250, eval_modes=("quantize",)),
                                     str(tmp_path), quiet=True)   # 250 is not a multiple of 8 devices: padded
  assert out["examples"] == 360


def test_schedule_follows_a_batch_size_override():
  c = imagenet2012.get_config("small")
  c.lock()
  c.batch_size = 1024                     # what --config.batch_size=1024 does
  spe = imagenet2012.TRAIN_IMAGES // 1024
  assert (c.total_steps, c.optimizer.warmup_steps, c.eval_every) == (300 * spe, 5 * spe, 10 * spe)
  assert json.loads(c.to_json())["total_steps"] == 300 * spe


def test_mixing_partners_stay_in_their_shard():
  mesh = shd.make_mesh(1)
  partners = mixing.shard_local_reverse(mesh, shd.DATA_AXES)
  x = jax.device_put(np.arange(32, dtype=np.float32).reshape(32, 1, 1, 1) * np.ones((1, 4, 4, 3), np.float32),
                     shd.batch_sharding(mesh, 4))
  y = jax.device_put(np.eye(10, dtype=np.float32)[np.arange(32) % 10], shd.batch_sharding(mesh, 2))
  fn = jax.jit(lambda im, lab: mixing.mix(im, lab, jax.random.key(0), 0.8, 1.0, partners))
  assert cross_device_ops(fn, x, y) == [], "cross-device pairing"
  expected = np.arange(32).reshape(8, 4)[:, ::-1].reshape(-1)   # the mirror image within each device's 4
  np.testing.assert_array_equal(np.asarray(partners(x))[:, 0, 0, 0], expected)
  images, labels = fn(x, y)
  labels = np.asarray(labels)
  assert images.shape == x.shape and np.allclose(labels.sum(-1), 1.0)
  assert all(set(np.flatnonzero(labels[i])) <= {i % 10, expected[i] % 10} for i in range(32))


def test_a_work_directory_that_cannot_be_written_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  wd = tmp_path / "a_file" / "run"          # what a read-only mount or a missing permission looks like
  with pytest.raises(RuntimeError, match=r"Cannot (use|write) the work directory .*a_file/run: \w+Error") as err:
    train_lib.train_and_evaluate(small_digits(2), str(wd), quiet=True)
  assert "\n" not in str(err.value) and (tmp_path / "a_file").read_text() == ""


def test_compile_cache_location(monkeypatch, tmp_path):
  old = jax.config.jax_compilation_cache_dir
  try:
    assert shd.enable_compile_cache("") == os.environ["JAX_COMPILATION_CACHE_DIR"]   # the environment wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert shd.enable_compile_cache("") == str(tmp_path / "ge2mst_jax" / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ge2mst_jax" / "xla")
    assert shd.enable_compile_cache("/somewhere/else") == "/somewhere/else"
    assert shd.enable_compile_cache("off") is None
  finally:
    jax.config.update("jax_compilation_cache_dir", old)


def test_augmentation_and_initialisation_draw_independent_keys():
  # nnx.Rngs(seed) initialises with fold_in(key(seed), i): an augmentation key
  # fold_in(key(seed), step) would correlate step i's mixup/cutmix with the i-th initial weights.
  from flax import nnx
  seed = 0
  rngs = nnx.Rngs(seed)
  init_keys = {tuple(np.asarray(jax.random.key_data(rngs.params())).tolist()) for _ in range(256)}
  aug = mixing.augmentation_key(seed)
  aug_keys = {tuple(np.asarray(jax.random.key_data(jax.random.fold_in(aug, s))).tolist()) for s in range(256)}
  assert len(init_keys) == len(aug_keys) == 256 and not init_keys & aug_keys
  naive = {tuple(np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), s))).tolist())
           for s in range(256)}
  assert naive & init_keys   # the collision the separate stream avoids
