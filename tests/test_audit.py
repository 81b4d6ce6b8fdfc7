"""The spike-driven audit: every synaptic operation of spike-mode inference, looked at with real values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ge2mst_jax import attention, audit, energy, models
from ge2mst_jax.neurons import weighted_step_sum

# One worker builds the tiny network and its audit once.
pytestmark = pytest.mark.xdist_group("tiny_audit")


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0))
  model.eval()
  return model, jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


@pytest.fixture(scope="module")
def result(tiny):
  return audit.audit(*tiny)


def test_default_spike_mode_has_no_unexpected_non_spike_operation(result):
  t = result["totals"]
  assert result["mode"] == "spike" and result["integration"] == "steps"
  assert result["unexpected"] == [] and t["unexpected"] == 0 and result["unaudited"] == []
  rows = {r["layer"]: r for r in result["layers"]}
  # the stem on pixels is the one expected exception
  assert rows["stem.conv"]["exception"] == audit.EXCEPTION_REAL_INPUT and rows["stem.conv"]["spike_driven"] == 0
  assert t["expected_exceptions"] == 1 and t["spike_driven"] == t["ops"] - 1
  products = [r for name, r in rows.items() if name.endswith((".qk", ".av"))]
  assert len(products) == 6            # Q K^T and A V in each of the three attention blocks
  for r in products:                   # step against step: a spike train on both sides of every product
    assert r["operands"] == ["spikes×spikes"] and r["spike_driven"] == r["ops"] > 0
  depthwise = [r for r in result["layers"] if r["primitives"] == ["depthwise mul"]]
  assert len(depthwise) == 4 and all(r["ops"] == 9 == r["spike_driven"] for r in depthwise)  # 3x3 taps
  assert all(r["spike_driven"] == r["ops"] for name, r in rows.items() if name != "stem.conv")


def test_audit_sops_equal_energy_counts(tiny, result):
  t = result["totals"]
  assert t["sops_agree"] and t["max_abs_sop_diff"] == 0
  assert all(r["agree"] for r in result["layers"] if r["exception"] is None)
  assert t["sops_audit"] == t["sops_energy"] > 0
  # and the jitted energy report counts the same spikes
  assert energy.energy_report(*tiny)["sops_per_image"] == pytest.approx(t["sops_audit"], rel=1e-6)
  table = audit.format_audit(result)
  assert "**0 unexpected**" in table and "| stages.1.1.attn.qk | 8 | 8 | dot_general | spikes×spikes |" in table


def test_integer_code_products_are_flagged(tiny, monkeypatch):
  """The attention products as they were before: `einsum(code(a), code(b))`, integers on both sides."""
  monkeypatch.setattr(attention, "spike_pair_product",
                      lambda spec, a, b: jnp.einsum(spec, weighted_step_sum(a), weighted_step_sum(b)))
  res = audit.audit(*tiny)
  flagged = sorted({u["layer"] for u in res["unexpected"]})
  assert flagged == [f"stages.{s}.1.attn.{p}" for s in (1, 2, 3) for p in ("av", "qk")]
  assert all(u["operands"] == "values×values" for u in res["unexpected"])
  assert "**10 unexpected**" in audit.format_audit(res)


def test_code_integration_is_a_named_exception(tiny):
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0), spike_integration="code")
  res = audit.audit(model, tiny[1])
  assert res["integration"] == "code" and res["unexpected"] == []
  rows = [r for r in res["layers"] if r["layer"] != "stem.conv"]
  assert rows and all(r["exception"] == audit.EXCEPTION_CODE and r["spike_driven"] == 0 for r in rows)
  assert res["totals"]["sops_audit"] is None and not res["totals"]["sops_agree"]
  assert res["totals"]["sops_energy"] == pytest.approx(energy.energy_report(*tiny)["sops_per_image"], rel=1e-6)
  assert "not compared" in audit.format_audit(res)


def test_operand_classification_and_sop_rule():
  assert audit.is_spikes(np.array([-1.0, 0.0, 1.0])) and not audit.is_spikes(np.array([0.0, 2.0]))
  assert not audit.is_spikes(np.array([1, 0], np.int32)) and not audit.is_spikes(np.array([np.nan]))
  a = np.array([[1.0, 0.0, -1.0]])                 # two spikes
  w = np.array([[0.5, 0.0], [2.0, 1.0], [0.0, 3.0]])
  dims = (((1,), (0,)), ((), ()))
  # against weights each spike reaches both outputs: 2 x 2, zeros in the weights included
  assert audit._sops("dot_general", {"dimension_numbers": dims}, a, w, True, False) == 4
  b = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
  # against spikes only coinciding pairs count: (0, 0), (2, 0), (2, 1)
  assert audit._sops("dot_general", {"dimension_numbers": dims}, a, b, True, True) == 3
