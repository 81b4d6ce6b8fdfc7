"""Programs reused across runs in one process: equal configs share them, others never do."""
import pathlib
import re

import jax
import pytest
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ge2mst_jax.train import evaluator as evaluators
from ge2mst_jax.train import mixing
from ge2mst_jax.train import programs
from ge2mst_jax.train import sharding as shd
from ge2mst_jax.train import loop as train_lib
from ge2mst_jax.train import state as train_state
from tests.test_train import small_digits


def _mix_calls(monkeypatch) -> list:
  """The arguments of every `mixing.mix` call from now on: the train step calls it while tracing only."""
  calls, real = [], mixing.mix
  monkeypatch.setattr(mixing, "mix", lambda *a: calls.append(a) or real(*a))
  return calls


def _leaves(node, prefix=""):
  """(dotted name, value) of every leaf of a config."""
  for k, v in node.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _changed(value):
  """Another value of the same type (None: an unset int placeholder)."""
  if value is None or isinstance(value, bool):
    return 1 if value is None else not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "_changed"
  return (*value, value[-1] if value else 1)   # a tuple


def _loop_only(name: str) -> bool:
  return name.split(".")[0] in programs.LOOP_ONLY_KEYS


def test_every_key_but_the_loop_only_ones_builds_new_programs():
  base = small_digits(8)
  key = programs.config_key(base)
  names = [name for name, _ in _leaves(base)]
  assert {n.split(".")[0] for n in names if _loop_only(n)} == programs.LOOP_ONLY_KEYS   # none misspelt
  for name, value in _leaves(base):
    assert (programs.config_key(small_digits(8, **{name: _changed(value)})) == key) == _loop_only(name), name


def _traced_programs(cfg, mesh, traced=("init", "train", "eval")) -> dict:
  """The abstract state and the `traced` programs the reused builders make of `cfg`, built past
  their cache and traced (nothing compiled), as comparable text and constants. A new builder must
  be added here."""
  normal = lambda text: re.sub(r" at 0x[0-9a-f]+", "", text)   # closures' addresses differ per build
  modes = ("quantize", "spike")
  graphdef, abstract, shardings = train_state._abstract_state.__wrapped__(cfg, mesh)
  setup = train_state.TrainSetup(graphdef, None, shardings, abstract, mesh)
  batch = {"image": jax.ShapeDtypeStruct((32, 16, 16, 3), jnp.float32), "label": jax.ShapeDtypeStruct((32,), jnp.int32)}
  metrics = nnx.state(evaluators.EvalMetrics(modes, cfg.data.num_classes))
  trace = {
      "init": lambda: train_state._init_program.__wrapped__(cfg, setup).trace(),
      "train": lambda: train_lib.make_train_step.__wrapped__(cfg, setup).trace(abstract, batch),
      "eval": lambda: evaluators.make_eval_step.__wrapped__(cfg, setup, modes).trace(
          abstract, metrics, batch | {"mask": jax.ShapeDtypeStruct((32,), jnp.bool_)})}
  keys = lambda c: jax.random.key_data(c) if jax.dtypes.issubdtype(c.dtype, jax.dtypes.prng_key) else c
  out = {"state": (normal(repr(graphdef)), jax.tree.structure(abstract), jax.tree.leaves(abstract),
                   jax.tree.leaves(shardings))}
  for name in traced:
    jaxpr = trace[name]().jaxpr
    out[name] = (normal(str(jaxpr)), [(np.asarray(keys(c)).tobytes(), c.shape, str(c.dtype)) for c in jaxpr.consts])
  return out


def test_the_loop_only_keys_reach_no_program():
  """The programs of a config with every loop-only value changed are those of the original,
  operation for operation and constant for constant; so the cache may share them."""
  builders = set()
  for path in pathlib.Path(programs.__file__).parents[1].rglob("*.py"):
    builders |= set(re.findall(r"@programs\.reused\ndef (\w+)", path.read_text()))
  assert builders == {"_abstract_state", "_init_program", "make_train_step", "make_eval_step"}, (
      "a new reused builder: compare its programs in _traced_programs")
  mesh = shd.make_mesh(1)
  base = _traced_programs(small_digits(8), mesh)
  loop_only = {name: _changed(v) for name, v in _leaves(small_digits(8)) if _loop_only(name)}
  changed = _traced_programs(small_digits(8, **loop_only), mesh)
  for name in base:
    assert changed[name] == base[name], f"a loop-only key changes the {name} program"
  # The comparison sees a difference where there is one: the seed is only the train step's
  # augmentation key (a constant), the precision a parameter of the evaluation's products.
  other = _traced_programs(small_digits(8, seed=1, eval_matmul_precision="default"), mesh, ("train", "eval"))
  assert other["train"][0] == base["train"][0] and other["train"][1] != base["train"][1]
  assert other["eval"][0] != base["eval"][0]


def test_equal_configs_share_the_step_and_later_edits_reach_no_built_program(monkeypatch):
  cfg, mesh = small_digits(8, **{"optimizer.lr": 0.04}), shd.make_mesh(1)
  setup = train_state.abstract_train_state(cfg, mesh)
  step = train_lib.make_train_step(cfg, setup)
  again = train_state.abstract_train_state(small_digits(8, **{"optimizer.lr": 0.04}), shd.make_mesh(1))
  assert train_lib.make_train_step(small_digits(8, checkpoint_every=5, **{"optimizer.lr": 0.04}), again) is step
  assert train_lib.make_train_step(small_digits(8, **{"optimizer.lr": 0.5}), setup) is not step
  assert train_lib.make_train_step(cfg, train_state.abstract_train_state(cfg, shd.make_mesh(8))) is not step
  assert evaluators.make_eval_step(cfg, setup, ("quantize",)) is not evaluators.make_eval_step(cfg, setup, ("spike",))

  # jit traces at the first call: the caller's config, edited after the build, does not reach it.
  calls = _mix_calls(monkeypatch)
  cfg.mixup = 0.5
  batch = {"image": jax.ShapeDtypeStruct((32, 16, 16, 3), jnp.float32), "label": jax.ShapeDtypeStruct((32,), jnp.int32)}
  step.trace(setup.abstract, batch)
  assert [a[3] for a in calls] == [0.0]   # mix(images, labels, key, mixup, ...)


@pytest.mark.slow
def test_a_second_run_with_the_same_config_traces_no_step(tmp_path, monkeypatch):
  # The suite's most common training program (other tests' persistent-cache entry serves its
  # compile); train steps built before in this process are dropped, so the first run must trace.
  train_lib.make_train_step.cache_clear()
  traces = _mix_calls(monkeypatch)
  cfg = small_digits(8, eval_modes=("quantize",))
  first = train_lib.train_and_evaluate(cfg, str(tmp_path / "a"), quiet=True)
  assert len(traces) == 1
  second = train_lib.train_and_evaluate(small_digits(8, eval_modes=("quantize",), checkpoint_every=2),
                                        str(tmp_path / "b"), quiet=True)
  assert len(traces) == 1
  for a, b in zip(jax.tree.leaves(first["state"]), jax.tree.leaves(second["state"])):
    assert (jax.device_get(a) == jax.device_get(b)).all()
  assert first["accuracy_quantize"] == second["accuracy_quantize"]


def test_cache_clear_drops_the_built_programs():
  cfg, setup = small_digits(8), train_state.abstract_train_state(small_digits(8), shd.make_mesh(1))
  step = train_lib.make_train_step(cfg, setup)
  assert train_lib.make_train_step(cfg, setup) is step
  train_lib.make_train_step.cache_clear()
  assert train_lib.make_train_step(cfg, setup) is not step
