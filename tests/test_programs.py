"""Programs reused across runs in one process: equal configs share them, others never do."""
import jax
import jax.numpy as jnp

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


def test_the_key_ignores_only_what_the_loop_reads():
  base = programs.config_key(small_digits(8))
  for loop_only in ({"checkpoint_every": 3}, {"eval_batch_size": 48}, {"eval_modes": ("quantize",)},
                    {"log_every": 7}, {"lease.timeout_secs": 5.0}, {"profile.steps": 2}):
    assert programs.config_key(small_digits(8, **loop_only)) == base, loop_only
  for program in ({"optimizer.lr": 0.5}, {"nonfinite": "skip"}, {"model.arch.stem_width": 12}, {"mixup": 0.2},
                  {"seed": 1}, {"alpha.ramp_end": 0.5}, {"eval_matmul_precision": "default"}):
    assert programs.config_key(small_digits(8, **program)) != base, program
  assert programs.config_key(small_digits(9)) != base   # the schedules' length


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
