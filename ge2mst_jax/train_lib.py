"""Train state, the pure jitted train and eval steps, and the training loop (no CLI here).

The whole state (model parameters, BatchNorm statistics, optimizer state and step) is one
`nnx.State` pytree, created already sharded by `jax.jit(..., out_shardings=...)`; the train
step is one pure function of (state, batch), jitted with `NamedSharding`s and a donated state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ge2mst_jax import checkpoint as ckpt_lib
from ge2mst_jax import data as data_lib
from ge2mst_jax import mixing
from ge2mst_jax import paths
from ge2mst_jax import sharding as shd
from ge2mst_jax.metrics import MetricWriter
from ge2mst_jax.models import ArchConfig, Ge2msT
from ge2mst_jax.neurons import alpha_schedule
from ge2mst_jax.run_control import Lease, NonFiniteError, Preempted, PreemptionCheck, Watchdog


# ----------------------------------------------------------------------------
# Model, optimizer, state
# ----------------------------------------------------------------------------
def arch_from_config(cfg) -> ArchConfig:
  arch = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.model.arch.items()}
  return ArchConfig(**arch).validate()


def build_model(cfg) -> Ge2msT:
  return Ge2msT(arch_from_config(cfg), cfg.data.num_classes, rngs=nnx.Rngs(cfg.seed))


def eval_modes(cfg) -> tuple:
  """The modes evaluated after training: `cfg.eval_modes` for ExpG-IF, the network itself for STBP."""
  arch = arch_from_config(cfg)
  return arch.eval_modes if arch.paradigm == "stbp" else tuple(cfg.eval_modes)


def learning_rate_schedule(cfg) -> optax.Schedule:
  o = cfg.optimizer
  peak = o.lr * cfg.batch_size / o.base_batch_size   # linear scaling rule
  warmup = min(o.warmup_steps, max(cfg.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.total_steps, warmup + 1),
                                            end_value=peak * o.min_lr_ratio)


def make_optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optimizer
  # No weight decay on thresholds, BatchNorm and biases (1-D or scalar parameters).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  if o.name == "adamw":
    chain.append(optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
  elif o.name == "sgd":  # momentum SGD with decoupled weight decay
    chain += [optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
              optax.sgd(learning_rate_schedule(cfg), momentum=o.b1, nesterov=True)]
  else:
    raise ValueError(f"optimizer.name={o.name!r}: use 'adamw' or 'sgd'.")
  return optax.chain(*chain)


@dataclasses.dataclass
class TrainSetup:
  graphdef: Any
  state: Any               # nnx.State of (model, optimizer), sharded
  shardings: Any
  abstract: Any
  mesh: jax.sharding.Mesh


def create_train_state(cfg, mesh) -> TrainSetup:
  tx = make_optimizer(cfg)

  def build():
    model = build_model(cfg)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  shardings = shd.state_shardings(abstract, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
  return TrainSetup(graphdef, state, shardings, abstract, mesh)


def restore_train_state(cfg, checkpoint_dir: str, mesh, step: int | None = None,
                        fallback: bool = True) -> tuple[TrainSetup, int]:
  """A train state for `cfg` on `mesh`, filled from `checkpoint_dir` (any mesh may have written it)."""
  setup = create_train_state(cfg, mesh)
  step, pure = ckpt_lib.restore_state_only(checkpoint_dir, ckpt_lib.abstract_pure(setup.abstract, setup.shardings),
                                           step, fallback)
  nnx.replace_by_pure_dict(setup.state, pure)
  return setup, step


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def make_train_step(cfg, setup: TrainSetup):
  graphdef, total = setup.graphdef, max(cfg.total_steps, 1)
  a = cfg.alpha
  num_classes, smoothing = cfg.data.num_classes, cfg.label_smoothing
  lr_fn = learning_rate_schedule(cfg)
  skip_nonfinite = cfg.nonfinite == "skip"
  inject_step = cfg.get("debug_nan_at_step", -1)
  train_mode = arch_from_config(cfg).train_mode
  partners = mixing.shard_local_reverse(setup.mesh, shd.DATA_AXES)
  # Its own stream: nnx.Rngs(seed) draws fold_in(key(seed), i) for initialisation, so
  # fold_in(key(seed), step) here would reuse the initialisation's keys.
  aug_key = jax.random.split(jax.random.key(cfg.seed))[1]

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    step = opt.step[...]
    alpha = alpha_schedule(step / total, a.kind, a.ramp_end, a.get("power", 1.0))
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
    images, labels = mixing.mix(batch["image"], labels, jax.random.fold_in(aug_key, step), cfg.mixup, cfg.cutmix,
                                partners)

    def loss_fn(model):
      logits = model(images, mode=train_mode, alpha=alpha)
      loss = optax.softmax_cross_entropy(logits, labels).mean()
      return jnp.where(step + 1 == inject_step, jnp.nan, loss), logits  # loop steps count from 1

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      old = jax.tree.map(lambda x: x, nnx.state((model, opt)))  # a copy: update() mutates in place
    opt.update(model, grads)
    new = nnx.state((model, opt))
    if skip_nonfinite:  # drop the update, but count the step so the schedules move on
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      model, opt = nnx.merge(graphdef, new)
      opt.step[...] = step + 1
      new = nnx.state((model, opt))
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": acc, "alpha": alpha, "lr": lr_fn(step), "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    return new, metrics

  batch_sh = {"image": shd.batch_sharding(setup.mesh, 5 if cfg.data.get("event_frames") else 4),
              "label": shd.batch_sharding(setup.mesh, 1)}
  return jax.jit(train_step, in_shardings=(setup.shardings, batch_sh), out_shardings=(setup.shardings, None),
                 donate_argnums=0)


def make_eval_step(cfg, setup: TrainSetup, modes=("quantize", "spike")):
  """Counts of correct top-1 (and top-5) predictions per mode, agreement and logit differences."""
  graphdef = setup.graphdef

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    mask = batch["mask"]
    out = {"count": jnp.sum(mask)}
    logits = {}
    for mode in modes:
      lg = model(batch["image"], mode=mode)
      logits[mode] = lg
      pred = jnp.argmax(lg, -1)
      out[f"correct_{mode}"] = jnp.sum((pred == batch["label"]) & mask)
      if lg.shape[-1] > 10:
        top5 = jnp.any(jax.lax.top_k(lg, 5)[1] == batch["label"][:, None], axis=-1)
        out[f"correct5_{mode}"] = jnp.sum(top5 & mask)
    if set(modes) == {"quantize", "spike"}:
      q, s = logits["quantize"], logits["spike"]
      out["agree"] = jnp.sum((jnp.argmax(q, -1) == jnp.argmax(s, -1)) & mask)
      rel = jnp.max(jnp.abs(q - s), -1) / jnp.maximum(jnp.max(jnp.abs(q), -1), 1e-12)
      out["max_rel_logit_diff"] = jnp.max(jnp.where(mask, rel, 0.0))
    return out

  return jax.jit(eval_step, in_shardings=(setup.shardings, None))


def evaluate(cfg, setup: TrainSetup, state, eval_step=None, modes=None,
             progress: bool = False, beat=lambda: None) -> dict[str, float]:
  """Accuracy (and agreement) over the test split; `beat()` after each batch (the watchdog)."""
  eval_step = eval_step or make_eval_step(cfg, setup, modes or eval_modes(cfg))
  sums: dict[str, float] = {}
  batches = data_lib.eval_batches(cfg.data, cfg.eval_batch_size, setup.mesh.devices.size)
  if progress and jax.process_index() == 0:
    import sys

    from tqdm import tqdm
    total = -(-data_lib.num_examples(cfg.data, "test") // cfg.eval_batch_size)
    batches = tqdm(batches, total=total, desc="eval", unit="batch", disable=not sys.stderr.isatty())
  for local in batches:
    out = jax.device_get(eval_step(state, shd.global_batch(local, setup.mesh)))
    beat()
    for k, v in out.items():
      sums[k] = max(sums.get(k, 0.0), float(v)) if k == "max_rel_logit_diff" else sums.get(k, 0.0) + float(v)
  n = max(sums.pop("count", 0.0), 1.0)
  res = {}
  for k, v in sums.items():
    if k.startswith("correct5_"):
      res[f"top5_accuracy_{k[9:]}"] = v / n
    elif k.startswith("correct_"):
      res[f"accuracy_{k[8:]}"] = v / n
    elif k == "agree":
      res["prediction_agreement"] = v / n
    else:
      res[k] = v
  res["examples"] = n
  return res


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
  arch = arch_from_config(cfg)
  if arch.image_size != cfg.data.image_size:
    raise ValueError(f"model.arch.image_size={arch.image_size} differs from data.image_size={cfg.data.image_size}: "
                     f"set both to the same size.")
  if arch.event_frames != cfg.data.get("event_frames", 0):
    raise ValueError(f"model.arch.event_frames={arch.event_frames} differs from data.event_frames="
                     f"{cfg.data.get('event_frames', 0)}: set both to the number of event frames.")
  data_lib.check_data(cfg.data)


def check_workdir(workdir):
  """The work directory as an epath, after checking it can be reached (a bucket that does not
  exist or cannot be listed is a one-line error here, before anything is written)."""
  wd = paths.resolve(workdir)
  gcsfs_log = logging.getLogger("gcsfs")
  level = gcsfs_log.level
  gcsfs_log.setLevel(logging.CRITICAL)  # its retries log tracebacks; the one line below says it all
  try:
    bucket = paths.bucket(wd)
    if bucket is not None and not bucket.exists():
      raise FileNotFoundError(f"bucket {bucket} does not exist")
    if wd.exists() and not wd.is_dir():
      raise NotADirectoryError(f"{wd} is a file")
  except Exception as e:  # gcsfs/auth raise many types: the message is what helps
    raise RuntimeError(f"Cannot use the work directory {wd}: {paths.describe(e)}. Check the path, the bucket "
                       f"name and its credentials (gcloud auth application-default login).") from None
  finally:
    gcsfs_log.setLevel(level)
  return wd


@contextlib.contextmanager
def workdir_lease(cfg, wd):
  """Process 0 holds the work directory's lease for the run; every host learns whether it did."""
  lease, err = None, None
  if jax.process_index() == 0:
    try:
      wd.mkdir(parents=True, exist_ok=True)
      lease = Lease(wd, cfg.lease.timeout_secs, cfg.lease.heartbeat_secs).acquire()
    except RuntimeError as e:
      err = e
    except Exception as e:  # permissions, unreachable storage
      err = RuntimeError(f"Cannot write the work directory {wd}: {paths.describe(e)}. Check its "
                         f"permissions (on a bucket: the account's storage.objects.create role).")
  if not shd.all_hosts(err is None):
    raise err or RuntimeError(f"Process 0 could not take the lease of {wd} (see its error); stopping.")
  try:
    yield lease
  finally:
    if lease is not None:
      lease.release()


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir, quiet: bool = False) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates both modes, returns the summary.

  `workdir` may be local or a bucket (`gs://...`). Nothing is written to it before the config,
  the data and the work directory itself have been checked.
  """
  shd.maybe_initialize_distributed(cfg)
  mesh = shd.make_mesh(cfg.mesh.fsdp)
  validate_config(cfg, mesh)
  wd = check_workdir(workdir)
  with workdir_lease(cfg, wd) as lease:
    return _train(cfg, wd, mesh, quiet, lease)


def _train(cfg, wd, mesh, quiet: bool, lease) -> dict[str, Any]:
  setup = create_train_state(cfg, mesh)
  modes = eval_modes(cfg)
  with contextlib.ExitStack() as stack:  # closes what was opened, in reverse, however the run ends
    # ---- State: fresh, or restored from the newest usable checkpoint (one decision for all hosts).
    ckpts = stack.enter_context(contextlib.closing(ckpt_lib.Checkpoints(
        wd / "checkpoints", cfg.keep_checkpoints, async_save=cfg.async_checkpoints,
        best_metric="accuracy_spike" if "spike" in modes else f"accuracy_{modes[0]}")))  # close() waits for saves
    state = setup.state
    start, restored, position = ckpts.restore(ckpt_lib.abstract_pure(setup.abstract, setup.shardings),
                                              quarantine=True, saved_config=ckpt_lib.read_config(wd, required=False),
                                              config=cfg)
    if restored is not None:
      nnx.replace_by_pure_dict(state, restored)
    start = start or 0
    if start == 0 and cfg.init_from.checkpoint:
      from ge2mst_jax.finetune import load_pretrained  # fine-tuning start (eval/export issue)
      state = load_pretrained(cfg, setup, state)
    if jax.process_index() == 0:
      ckpt_lib.save_config(cfg, wd)  # only now: a refused restore leaves the run's config as it was

    # ---- Input, resumed at the saved position (also on another host count: data.resume_records).
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
    t0, seen, last_log = time.time(), 0, start
    for step in range(start + 1, cfg.total_steps + 1):
      batch = shd.global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      records += local_bs
      seen += cfg.batch_size
      watchdog.beat(step)
      stop = preemption.reached(step)  # every host, every step: they agree on the step
      saving = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step != cfg.total_steps
      if step % cfg.log_every == 0 or step == cfg.total_steps or saving or stop:
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
        ckpts.save(step, state, data_lib.data_position(records, n_train), force=stop)
      if stop:
        ckpts.wait()
        raise Preempted(f"Stopped by {preemption.describe()} at step {step}; saved {ckpts.step_path(step)}. "
                        f"Run the same command to resume.")
      if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.total_steps:
        res = evaluate(cfg, setup, state, eval_step, modes, beat=lambda: watchdog.beat(step, "eval"))
        writer.write(step, res, "eval")
        ckpts.save_best(step, state, res)
    if start < cfg.total_steps:
      ckpts.save(cfg.total_steps, state, data_lib.data_position(records, n_train), force=True)
    final = evaluate(cfg, setup, state, eval_step, modes, beat=lambda: watchdog.beat(cfg.total_steps, "eval"))
    writer.write(cfg.total_steps, final, "eval")
    ckpts.save_best(cfg.total_steps, state, final)
    ckpts.wait()
  arch = arch_from_config(cfg)
  summary = {"step": cfg.total_steps, "workdir": str(wd), **final, "T": arch.T, "K": arch.K}
  if jax.process_index() == 0:
    paths.write_text_atomic(wd / "summary.json", json.dumps(summary, indent=2))
  return summary | {"state": state, "setup": setup}
