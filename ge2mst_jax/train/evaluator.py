"""Accuracy over the test split: a jitted step folds each batch into `nnx.metrics` held on device.

The metrics are a small NNX module (`EvalMetrics`) whose state travels through the step as a
pytree, so evaluation syncs with the host once, at the end, not once a batch.
"""
from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.train import programs
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train.state import TrainSetup, eval_modes, model_and_optimizer


class Maximum(nnx.metrics.Metric):
  """The largest masked value seen (of non-negative values)."""

  def __init__(self):
    self.value = nnx.metrics.MetricState(jnp.zeros((), jnp.float32))

  def reset(self) -> None:
    self.value[...] = jnp.zeros((), jnp.float32)

  def update(self, *, values: jax.Array, mask: jax.Array, **_) -> None:
    self.value[...] = jnp.maximum(self.value[...], jnp.max(jnp.where(mask, values, 0.0)))

  def compute(self) -> jax.Array:
    return self.value[...]


class EvalMetrics(nnx.Module):
  """Top-1 accuracy per mode (and top-5 beyond 10 classes); with both ExpG-IF modes, how often
  spike and quantize predict the same class and their largest relative logit difference."""

  def __init__(self, modes, num_classes: int):
    self.modes = tuple(modes)
    self.accuracy = nnx.Dict({m: nnx.metrics.Accuracy() for m in self.modes})
    self.top5 = nnx.Dict({m: nnx.metrics.Average() for m in self.modes}) if num_classes > 10 else None
    self.paired = set(self.modes) == {"quantize", "spike"}
    if self.paired:
      self.agreement = nnx.metrics.Average()
      self.max_rel_logit_diff = Maximum()

  def update(self, logits: dict, labels: jax.Array, mask: jax.Array) -> None:
    for m in self.modes:
      self.accuracy[m].update(logits=logits[m], labels=labels, mask=mask)
      if self.top5 is not None:
        self.top5[m].update(values=jnp.any(jax.lax.top_k(logits[m], 5)[1] == labels[:, None], -1), mask=mask)
    if self.paired:
      q, s = logits["quantize"], logits["spike"]
      self.agreement.update(values=jnp.argmax(q, -1) == jnp.argmax(s, -1), mask=mask)
      rel = jnp.max(jnp.abs(q - s), -1) / jnp.maximum(jnp.max(jnp.abs(q), -1), 1e-12)
      self.max_rel_logit_diff.update(values=rel, mask=mask)

  def compute(self) -> dict[str, float]:
    # Ratios of the exact integer counts in float64 on the host (nnx's compute() divides in float32).
    ratio = lambda avg: float(avg.total[...]) / max(int(avg.count[...]), 1)
    out = {f"accuracy_{m}": ratio(self.accuracy[m]) for m in self.modes}
    if self.top5 is not None:
      out |= {f"top5_accuracy_{m}": ratio(self.top5[m]) for m in self.modes}
    if self.paired:
      out |= {"prediction_agreement": ratio(self.agreement),
              "max_rel_logit_diff": float(self.max_rel_logit_diff.compute())}
    return out | {"examples": float(int(self.accuracy[self.modes[0]].count[...]))}


@programs.reused
def make_eval_step(cfg, setup: TrainSetup, modes=("quantize", "spike")):
  """`eval_step(state, metrics_state, batch) -> metrics_state` (`EvalMetrics(modes, ...)`'s state)."""
  graphdef = setup.graphdef
  metrics_def, _ = nnx.split(EvalMetrics(modes, cfg.data.num_classes))
  precision = cfg.eval_matmul_precision

  def eval_step(state, metrics_state, batch):
    model, _ = model_and_optimizer(graphdef, state)
    model.eval()
    metrics = nnx.merge(metrics_def, metrics_state)
    with jax.default_matmul_precision(None if precision == "default" else precision):
      logits = {m: model(batch["image"], mode=m) for m in modes}
    metrics.update(logits, batch["label"], batch["mask"])
    return nnx.state(metrics)

  return jax.jit(eval_step, in_shardings=(setup.shardings, None, None), donate_argnums=1)


def evaluate(cfg, setup: TrainSetup, state, eval_step=None, modes=None,
             progress: bool = False, watchdog=None, step: int = 0) -> dict[str, float]:
  """Accuracy (and agreement) over the test split.

  With a `run_control.Watchdog`, each batch beats once its result is ready (the batch before is
  awaited only after the next one was read, so input and compute still overlap) and the first
  batch, which compiles, is held.
  """
  modes = tuple(modes or eval_modes(cfg))
  eval_step = eval_step or make_eval_step(cfg, setup, modes)
  metrics_def, metrics_state = nnx.split(EvalMetrics(modes, cfg.data.num_classes))
  metrics_state = jax.device_put(metrics_state, NamedSharding(setup.mesh, P()))  # the same on every host
  batches = data_lib.eval_batches(cfg.data, cfg.eval_batch_size, setup.mesh.devices.size)
  if progress and jax.process_index() == 0:
    total = -(-data_lib.num_examples(cfg.data, "test") // cfg.eval_batch_size)
    batches = tqdm(batches, total=total, desc="eval", unit="batch", disable=not sys.stderr.isatty())
  for i, local in enumerate(batches):
    batch = shd.global_batch(local, setup.mesh)
    if watchdog is None:
      metrics_state = eval_step(state, metrics_state, batch)
      continue
    if i:
      jax.block_until_ready(metrics_state)
      watchdog.beat(step, "eval")
    with watchdog.held("compile", step) if i == 0 else contextlib.nullcontext():
      metrics_state = eval_step(state, metrics_state, batch)
  return nnx.merge(metrics_def, jax.device_get(metrics_state)).compute()
