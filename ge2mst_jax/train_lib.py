"""Train state, the pure jitted train and eval steps, and the training loop (no CLI here).

The whole state (model parameters, BatchNorm statistics, optimizer state and step) is one
`nnx.State` pytree, created already sharded by `jax.jit(..., out_shardings=...)`; the train
step is one pure function of (state, batch), jitted with `NamedSharding`s and a donated state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ge2mst_jax import checkpoint as ckpt_lib
from ge2mst_jax import data as data_lib
from ge2mst_jax import sharding as shd
from ge2mst_jax.metrics import MetricWriter
from ge2mst_jax.models import ArchConfig, Ge2msT
from ge2mst_jax.neurons import alpha_schedule


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the current step was saved."""


class WorkdirLock:
  """An exclusive lock file so that two runs cannot write one work directory at once."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.held = False

  def __enter__(self):
    import socket
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        try:
          with open(self.path) as f:
            host, pid = f.read().split()
        except (OSError, ValueError):
          host, pid = "", "0"
        if host == socket.gethostname() and not _pid_alive(int(pid)):
          os.remove(self.path)  # a stale lock of a run that died
          continue
        raise RuntimeError(f"Work directory {os.path.dirname(self.path)} is in use by process {pid} on {host} "
                           f"(lock file {self.path}): wait for it, pass another --workdir, or delete the lock "
                           f"file if that run is gone.") from None
      with os.fdopen(fd, "w") as f:
        f.write(me)
      self.held = True
      return self
    raise RuntimeError(f"Could not take the lock {self.path}.")

  def __exit__(self, *exc):
    if self.held and os.path.exists(self.path):
      os.remove(self.path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    import signal
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


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
def _mix(images, labels, rng, mixup: float, cutmix: float):
  """Mixup or CutMix (chosen 50/50 when both are on) with one lambda per batch."""
  if mixup <= 0 and cutmix <= 0:
    return images, labels
  k_choice, k_lam, k_box = jax.random.split(rng, 3)
  perm = jnp.arange(images.shape[0])[::-1]
  use_cut = (cutmix > 0) & ((mixup <= 0) | jax.random.bernoulli(k_choice))
  lam = jax.random.beta(k_lam, *(2 * [jnp.where(use_cut, max(cutmix, 1e-3), max(mixup, 1e-3))]))
  H, W = images.shape[1:3]
  cut = jnp.sqrt(1 - lam)
  ch, cw = (H * cut).astype(jnp.int32), (W * cut).astype(jnp.int32)
  cy, cx = jax.random.randint(k_box, (2,), 0, jnp.asarray([H, W]))
  ys, xs = jnp.arange(H)[:, None], jnp.arange(W)[None, :]
  box = (jnp.abs(ys - cy) <= ch // 2) & (jnp.abs(xs - cx) <= cw // 2)
  box = box.reshape((1, H, W) + (1,) * (images.ndim - 3))
  lam_cut = 1 - jnp.mean(box)
  mixed_cut = jnp.where(box, images[perm], images)
  mixed_up = lam * images + (1 - lam) * images[perm]
  images = jnp.where(use_cut, mixed_cut, mixed_up)
  lam = jnp.where(use_cut, lam_cut, lam)
  return images, lam * labels + (1 - lam) * labels[perm]


def make_train_step(cfg, setup: TrainSetup):
  graphdef, total = setup.graphdef, max(cfg.total_steps, 1)
  a = cfg.alpha
  num_classes, smoothing = cfg.data.num_classes, cfg.label_smoothing
  lr_fn = learning_rate_schedule(cfg)
  skip_nonfinite = cfg.nonfinite == "skip"
  inject_step = cfg.get("debug_nan_at_step", -1)
  train_mode = arch_from_config(cfg).train_mode

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    step = opt.step[...]
    alpha = alpha_schedule(step / total, a.kind, a.ramp_end, a.get("power", 1.0))
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
    images, labels = _mix(batch["image"], labels, jax.random.fold_in(jax.random.key(cfg.seed), step),
                          cfg.mixup, cfg.cutmix)

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
             progress: bool = False) -> dict[str, float]:
  eval_step = eval_step or make_eval_step(cfg, setup, modes or eval_modes(cfg))
  sums: dict[str, float] = {}
  batches = data_lib.eval_batches(cfg.data, cfg.eval_batch_size)
  if progress and jax.process_index() == 0:
    import sys

    from tqdm import tqdm
    total = -(-data_lib.num_examples(cfg.data, "test") // cfg.eval_batch_size)
    batches = tqdm(batches, total=total, desc="eval", unit="batch", disable=not sys.stderr.isatty())
  for local in batches:
    out = jax.device_get(eval_step(state, shd.global_batch(local, setup.mesh)))
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
  for name in ("batch_size", "eval_batch_size"):
    if cfg[name] % n_dev:
      raise ValueError(f"{name}={cfg[name]} is not divisible by the {n_dev} devices: use a multiple of {n_dev}.")
  if cfg.total_steps < 1:
    raise ValueError(f"total_steps={cfg.total_steps} must be >= 1.")
  if cfg.nonfinite not in ("stop", "skip"):
    raise ValueError(f"nonfinite={cfg.nonfinite!r}: use 'stop' or 'skip'.")
  arch = arch_from_config(cfg)
  if arch.image_size != cfg.data.image_size:
    raise ValueError(f"model.arch.image_size={arch.image_size} differs from data.image_size={cfg.data.image_size}: "
                     f"set both to the same size.")
  if arch.event_frames != cfg.data.get("event_frames", 0):
    raise ValueError(f"model.arch.event_frames={arch.event_frames} differs from data.event_frames="
                     f"{cfg.data.get('event_frames', 0)}: set both to the number of event frames.")
  data_lib.check_data(cfg.data)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, quiet: bool = False) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates both modes, returns the summary."""
  shd.maybe_initialize_distributed(cfg)
  mesh = shd.make_mesh(cfg.mesh.fsdp)
  validate_config(cfg, mesh)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return _train(cfg, workdir, mesh, quiet)
  with WorkdirLock(workdir):
    from ge2mst_jax.export import save_config
    save_config(cfg, workdir)
    return _train(cfg, workdir, mesh, quiet)


def _train(cfg, workdir: str, mesh, quiet: bool) -> dict[str, Any]:
  setup = create_train_state(cfg, mesh)
  train_iter = iter(data_lib.train_dataset(cfg.data, cfg.batch_size, cfg.seed))
  modes = eval_modes(cfg)
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints,
                               async_save=cfg.async_checkpoints,
                               best_metric="accuracy_spike" if "spike" in modes else f"accuracy_{modes[0]}")
  state = setup.state
  target = ckpt_lib.abstract_pure(setup.abstract, setup.shardings)
  start, restored = ckpts.restore(target, train_iter, quarantine=jax.process_index() == 0)
  if restored is not None:
    nnx.replace_by_pure_dict(state, restored)
  start = start or 0
  if start == 0 and cfg.init_from.checkpoint:
    from ge2mst_jax.finetune import load_pretrained  # fine-tuning start (eval/export issue)
    state = load_pretrained(cfg, setup, state)
  train_step = make_train_step(cfg, setup)
  eval_step = make_eval_step(cfg, setup, modes)
  writer = MetricWriter(workdir, cfg.total_steps, start, quiet)
  if start:
    writer.log(f"Resumed from {ckpts.step_path(start)} at step {start}.")
  t0, seen, last_log = time.time(), 0, start
  try:
    with _SignalFlag() as signals:
      for step in range(start + 1, cfg.total_steps + 1):
        batch = shd.global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        seen += cfg.batch_size
        saving = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step != cfg.total_steps
        if step % cfg.log_every == 0 or step == cfg.total_steps or saving or signals.signum:
          m = jax.device_get(metrics)
          if not m["finite"] and cfg.nonfinite == "stop":
            raise NonFiniteError(
                f"Non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}): "
                f"lower optimizer.lr or clip gradients (optimizer.grad_clip), or slow the alpha ramp "
                f"(alpha.ramp_end); the last good checkpoint in {ckpts.directory} is kept "
                f"(or set nonfinite='skip').")
          dt = time.time() - t0
          m["images_per_sec"] = seen / max(dt, 1e-9)
          writer.write(step, m)
          writer.advance(step - last_log)
          last_log, seen, t0 = step, 0, time.time()
        if saving:
          ckpts.save(step, state, train_iter)
        if signals.signum is not None:
          if not saving:
            ckpts.save(step, state, train_iter, force=True)
          ckpts.wait()
          raise Preempted(f"Stopped by signal {signals.signum} at step {step}; saved {ckpts.step_path(step)}. "
                          f"Run the same command to resume.")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.total_steps:
          res = evaluate(cfg, setup, state, eval_step, modes)
          writer.write(step, res, "eval")
          ckpts.save_best(step, state, res)
      if start < cfg.total_steps:
        ckpts.save(cfg.total_steps, state, train_iter, force=True)
      final = evaluate(cfg, setup, state, eval_step, modes)
      writer.write(cfg.total_steps, final, "eval")
      ckpts.save_best(cfg.total_steps, state, final)
      ckpts.wait()
  finally:
    ckpts.close()  # waits for any save in flight
    writer.close()
  summary = {"step": cfg.total_steps, "workdir": os.path.abspath(workdir), **final,
             "T": arch_from_config(cfg).T, "K": arch_from_config(cfg).K}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary | {"state": state, "setup": setup}
