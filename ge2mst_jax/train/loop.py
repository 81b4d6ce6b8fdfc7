"""The train step (one pure jitted function of state and batch) and the training loop.

Read `train_and_evaluate` top to bottom: checks, the work directory's lease, the state (fresh
or restored), the input at its saved position, the loop, the final save and evaluation. Model
and optimizer set-up is `state.py`, the evaluator `evaluator.py`, mixup/cutmix
`mixing.py`, the lease, preemption and watchdog `run_control.py`.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ge2mst_jax.train import checkpoint as ckpt_lib
from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.train import mixing
from ge2mst_jax.io import paths
from ge2mst_jax.train import profiling
from ge2mst_jax.train import programs
from ge2mst_jax.io import saved_config
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.io.errors import NonFiniteError, Preempted
from ge2mst_jax.train.evaluator import evaluate, make_eval_step
from ge2mst_jax.train.finetune import load_pretrained
from ge2mst_jax.train.metrics import MetricWriter
from ge2mst_jax.nn.models import arch_from_config
from ge2mst_jax.spiking.neurons import alpha_schedule
from ge2mst_jax.train.run_control import InFlight, PreemptionCheck, Watchdog, check_workdir, workdir_lease
from ge2mst_jax.train.state import (TrainSetup, abstract_train_state, eval_modes, fill, initialize,
                                    learning_rate_schedule, model_and_optimizer, state_of)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def alpha_schedule_of(cfg) -> optax.Schedule:
  """`cfg.alpha`'s schedule of the step count; `ramp_end` is a fraction of `cfg.total_steps`."""
  a = cfg.alpha
  return alpha_schedule(cfg.total_steps, a.kind, a.ramp_end, a.power)


@programs.reused
def make_train_step(cfg, setup: TrainSetup):
  graphdef = setup.graphdef
  alpha_fn = alpha_schedule_of(cfg)
  num_classes, smoothing = cfg.data.num_classes, cfg.label_smoothing
  lr_fn = learning_rate_schedule(cfg)
  skip_nonfinite = cfg.nonfinite == "skip"
  train_mode = arch_from_config(cfg).train_mode
  partners = mixing.shard_local_reverse(setup.mesh, shd.DATA_AXES)
  aug_key = mixing.augmentation_key(cfg.seed)

  def train_step(state, batch):
    # A copy taken before the forward pass, which updates BatchNorm statistics in place: a
    # skipped step must not keep statistics of the batch that made it non-finite.
    before = jax.tree.map(lambda x: x, state) if skip_nonfinite else None
    model, opt = model_and_optimizer(graphdef, state)
    step = opt.step[...]
    # An array even where the schedule is a Python 1.0 ('constant'): a static alpha would take
    # evaluation's exact-grid path (forward.Forward.on_grid) instead of training's.
    alpha = jnp.asarray(alpha_fn(step), jnp.float32)
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
    images, labels = mixing.mix(batch["image"], labels, jax.random.fold_in(aug_key, step), cfg.mixup, cfg.cutmix,
                                partners)

    def loss_fn(model):
      with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):   # for layers that shard_map a kernel
        logits = model(images, mode=train_mode, alpha=alpha)
      return optax.softmax_cross_entropy(logits, labels).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt.update(model, grads)
    new = state_of(model, opt)
    if skip_nonfinite:  # drop the update and the statistics, but count the step so the schedules move on
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, before)
      model, opt = model_and_optimizer(graphdef, new)
      opt.step[...] = step + 1
      new = state_of(model, opt)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": acc, "alpha": alpha, "lr": lr_fn(step), "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    return new, metrics

  batch_sh = {"image": shd.batch_sharding(setup.mesh, 5 if cfg.data.event_frames else 4),
              "label": shd.batch_sharding(setup.mesh, 1)}
  return jax.jit(train_step, in_shardings=(setup.shardings, batch_sh), out_shardings=(setup.shardings, None),
                 donate_argnums=0)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def validate_config(cfg, mesh) -> None:
  """Input errors that must surface before any compile or write."""
  n_dev = mesh.devices.size
  if cfg.batch_size % n_dev:
    raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {n_dev} devices: "
                     f"use a multiple of {n_dev}.")
  for name in ("batch_size", "eval_batch_size", "total_steps"):
    if cfg[name] < 1:
      raise ValueError(f"{name}={cfg[name]} must be >= 1.")
  if cfg.nonfinite not in ("stop", "skip"):
    raise ValueError(f"nonfinite={cfg.nonfinite!r}: use 'stop' or 'skip'.")
  if not 0 < cfg.lease.heartbeat_secs < cfg.lease.timeout_secs:
    raise ValueError(f"lease.heartbeat_secs={cfg.lease.heartbeat_secs} must be > 0 and below "
                     f"lease.timeout_secs={cfg.lease.timeout_secs}.")
  arch = arch_from_config(cfg)   # the network's own errors (model.arch), before anything is built
  # One FieldReference each in a config from configs/, but not in one whose arch was replaced whole.
  for key in ("image_size", "event_frames"):
    if getattr(arch, key) != cfg.data[key]:
      raise ValueError(f"model.arch.{key}={getattr(arch, key)} differs from data.{key}={cfg.data[key]}: set both "
                       f"to the same value.")
  alpha_schedule_of(cfg)   # its kind and ramp_end
  profiling.check(cfg)
  data_lib.check_data(cfg.data)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir, quiet: bool = False) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates both modes, returns the summary.

  `workdir` may be local or a bucket (`gs://...`). Nothing is written to it before the config,
  the data and the work directory itself have been checked.
  """
  # ---- Checks: a bad config, data set or work directory is one line, before anything is written.
  shd.maybe_initialize_distributed(cfg)
  mesh = shd.make_mesh(cfg.mesh.fsdp)
  validate_config(cfg, mesh)
  wd = check_workdir(workdir)
  modes = eval_modes(cfg)
  with contextlib.ExitStack() as stack:  # closes what was opened, in reverse, however the run ends
    lease = stack.enter_context(workdir_lease(cfg, wd))

    # ---- State: restored from the newest usable checkpoint (one decision for all hosts), or fresh;
    # a restore reads straight into the shardings, without initialising first.
    setup = abstract_train_state(cfg, mesh)
    ckpts = stack.enter_context(contextlib.closing(ckpt_lib.Checkpoints(
        wd / "checkpoints", cfg.keep_checkpoints, async_save=cfg.async_checkpoints,
        best_metric="accuracy_spike" if "spike" in modes else f"accuracy_{modes[0]}")))  # close() waits for saves
    start, restored, position = ckpts.restore(ckpt_lib.abstract_pure(setup.abstract, setup.shardings),
                                              quarantine=True, saved_cfg=saved_config.read(wd, required=False),
                                              config=cfg)
    state = (fill(setup, restored) if restored is not None else initialize(cfg, setup)).state
    start = start or 0
    if start == 0 and cfg.init_from.checkpoint:
      state = load_pretrained(cfg, setup, state)
    if jax.process_index() == 0:
      saved_config.save(cfg, wd)  # only now: a refused restore leaves the run's config as it was

    # ---- Input, resumed at the saved position (also on another host count: pipeline.resume_records).
    n_train = data_lib.num_examples(cfg.data, "train")
    local_bs = data_lib.local_batch_size(cfg.batch_size)
    records = data_lib.resume_records(position, n_train, start * local_bs)
    train_iter = iter(data_lib.train_dataset(cfg.data, cfg.batch_size, cfg.seed, start=records))

    train_step = make_train_step(cfg, setup)
    eval_step = make_eval_step(cfg, setup, modes)
    writer = stack.enter_context(contextlib.closing(MetricWriter(wd, cfg.total_steps, start, quiet)))
    if start:
      writer.log(f"Resumed from {ckpts.step_path(start)} at step {start}"
                 f" (epoch {data_lib.data_position(records, n_train)['epoch']}).")

    # ---- The loop.
    preemption = stack.enter_context(PreemptionCheck())
    watchdog = stack.enter_context(Watchdog(cfg.watchdog_secs))
    in_flight = InFlight(watchdog)
    trace = stack.enter_context(profiling.StepTrace(cfg, wd, start + 1, writer.log))
    t0, seen, last_log = time.time(), 0, start
    for step in range(start + 1, cfg.total_steps + 1):
      batch = shd.global_batch(next(train_iter), mesh)
      trace.before(step)
      with watchdog.held("compile", step) if step == start + 1 else contextlib.nullcontext():
        state, metrics = train_step(state, batch)
      trace.after(step, metrics)
      records += local_bs
      seen += cfg.batch_size
      in_flight.push(step, metrics)
      stop = preemption.reached(step)  # every host, every step: they agree on the step
      saving = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step != cfg.total_steps
      if step % cfg.log_every == 0 or step == cfg.total_steps or saving or stop:
        in_flight.drain()
        m = jax.device_get(metrics)
        if not m["finite"] and cfg.nonfinite == "stop":
          raise NonFiniteError(
              f"Non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}): "
              f"lower optimizer.lr or clip gradients (optimizer.grad_clip), or slow the alpha ramp "
              f"(alpha.ramp_end); the last good checkpoint in {ckpts.directory} is kept "
              f"(or set nonfinite='skip').")
        m["images_per_sec"] = seen / max(time.time() - t0, 1e-9)
        m["epoch"] = records * jax.process_count() / n_train
        writer.write(step, m)
        writer.advance(step - last_log)
        last_log, seen, t0 = step, 0, time.time()
      if lease is not None and lease.lost_to:
        raise RuntimeError(f"Another run ({lease.lost_to}) took over the work directory {wd} (this run's "
                           f"heartbeat was late by more than lease.timeout_secs); stopping without writing.")
      if saving or stop:
        with watchdog.in_phase("checkpoint", step):
          ckpts.save(step, state, data_lib.data_position(records, n_train), force=stop)
          if stop:
            ckpts.wait()
      if stop:
        raise Preempted(f"Stopped by {preemption.describe()} at step {step}; saved {ckpts.step_path(step)}. "
                        f"Run the same command to resume.")
      if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.total_steps:
        in_flight.drain()
        res = evaluate(cfg, setup, state, eval_step, modes, watchdog=watchdog, step=step)
        writer.write(step, res, "eval")
        with watchdog.in_phase("checkpoint", step):
          ckpts.save_best(step, state, res)

    # ---- The last step saved, the final evaluation, the summary.
    if start < cfg.total_steps:
      with watchdog.in_phase("checkpoint", cfg.total_steps):
        ckpts.save(cfg.total_steps, state, data_lib.data_position(records, n_train), force=True)
    final = evaluate(cfg, setup, state, eval_step, modes, watchdog=watchdog, step=cfg.total_steps)
    writer.write(cfg.total_steps, final, "eval")
    with watchdog.in_phase("checkpoint", cfg.total_steps):
      ckpts.save_best(cfg.total_steps, state, final)
      ckpts.wait()
    arch = arch_from_config(cfg)
    summary = {"step": cfg.total_steps, "workdir": str(wd), **final, "T": arch.T, "K": arch.K}
    if jax.process_index() == 0:
      paths.write_text_atomic(wd / "summary.json", json.dumps(summary, indent=2))
  return summary | {"state": state, "setup": setup}
