"""The package's shape: imports only run downward, the model costs only the model, and the
library's functions leave the caller's objects as they found them."""
import ast
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ge2mst_jax.evaluate import energy
from ge2mst_jax.nn import models
from tests import test_spike_audit
from tests.test_train import ROOT

PACKAGE = pathlib.Path(ROOT) / "ge2mst_jax"


# The subpackages top to bottom: a module may import its own subpackage's modules and those of
# the subpackages below it, never one above (the package docstring shows the same order).
LAYERS = ("evaluate", "weights", "train", "nn", "prepare", "data", "spiking", "io")


def module_name(path: pathlib.Path) -> str:
  return ".".join(("ge2mst_jax",) + path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.stem != "__init__")


def _imports(path: pathlib.Path) -> set[str]:
  """Every ge2mst_jax module `path` imports, at the top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}   # `from ge2mst_jax.train import checkpoint`
  return {m for m in found if m in MODULES}


def import_graph() -> dict[str, set[str]]:
  return {module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}


def layer(module: str) -> int:
  return LAYERS.index(module.split(".")[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  return sorted(f"{m} imports {n}" for m, ns in graph.items() for n in ns if layer(n) < layer(m))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state and (cycle := visit(n)):
        return cycle
    state[m] = "done"
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state and (cycle := visit(m)):
      return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_layer_check_finds_an_upward_import():
  graph = {"ge2mst_jax.nn.models": {"ge2mst_jax.train.checkpoint", "ge2mst_jax.spiking.neurons"},
           "ge2mst_jax.io.paths": set()}
  assert upward_imports(graph) == ["ge2mst_jax.nn.models imports ge2mst_jax.train.checkpoint"]


def test_every_module_sits_in_a_layer():
  assert {m.split(".")[1] for m in MODULES} == set(LAYERS) and len(MODULES) > 25


def test_no_module_imports_one_above_it_and_no_cycle():
  graph = import_graph()
  assert graph["ge2mst_jax.nn.blocks"] >= {"ge2mst_jax.spiking.neurons", "ge2mst_jax.spiking.stbp"}  # the walk sees imports
  assert graph["ge2mst_jax.weights"] >= {"ge2mst_jax.train.state", "ge2mst_jax.nn.models"}  # function-local too
  assert upward_imports(graph) == []
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_model_does_not_import_the_training_stack():
  # Built abstractly (nnx.eval_shape): the same imports and construction code as an eager build,
  # without compiling each initialiser op in a process that has no compilation cache (25 s).
  code = ("import sys, ge2mst_jax, ge2mst_jax.nn.models; from flax import nnx; "
          "nnx.eval_shape(lambda: ge2mst_jax.create_model('ge2mst_tiny', 10)); "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'grain', 'tensorflow_datasets', "
          "'tensorstore'}))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split("\n")[-2] == "[]"


def _batchnorm_modes(model) -> set[bool]:
  return {m.use_running_average for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)}


@pytest.mark.xdist_group("spike_audit")   # on test_spike_audit's worker, whose programs it shares
def test_energy_functions_leave_the_model_in_its_mode():
  # test_spike_audit's network and images: one compile of the instrumented pass serves both files.
  model = models.create_model("ge2mst_tiny", 10, image_size=16)
  assert _batchnorm_modes(model) == {False}   # training mode
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  energy.energy_report(model, test_spike_audit.IMAGES)
  energy.model_macs(model, (16, 16, 3))
  assert _batchnorm_modes(model) == {False}
  after = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)   # BatchNorm statistics untouched too


def test_create_model_seed_is_explicit_and_deterministic():
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  default, zero, other = (models.create_model("ge2mst_tiny", 10, **kw) for kw in ({}, {"rngs": 0}, {"rngs": 1}))
  assert all(np.array_equal(a, b) for a, b in zip(leaves(default), leaves(zero)))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(default), leaves(other)))


def test_load_and_export_are_the_functions_after_any_import():
  import ge2mst_jax
  import ge2mst_jax.weights  # noqa: F401  (a submodule import must not shadow the functions)
  assert callable(ge2mst_jax.load) and ge2mst_jax.export.__name__ == "export"
