"""The spike-driven audit: spike mode's program, evaluated on real inputs, op by op."""
import jax
import pytest
from flax import nnx

from ge2mst_jax.nn import attention, models
from ge2mst_jax.evaluate import spike_audit

# One worker for these tests and test_structure's energy check, which shares their programs.
pytestmark = pytest.mark.xdist_group("spike_audit")

IMAGES = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))


def _audit(**arch):
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0), image_size=16, **arch)
  model.eval()
  return spike_audit.audit(model, IMAGES)


@pytest.mark.slow
def test_default_spike_mode_is_spike_driven_and_its_sops_are_energys():
  """Every synaptic operation but the stem's has a spike operand; the attention products have
  two (step against step); SOPs counted from the operands equal energy.py's, layer by layer."""
  result = _audit()
  rows = {r["layer"]: r for r in result["layers"]}
  assert result["unexpected"] == [] and result["expected_exceptions"] == ["stem.conv"]
  assert result["spike_driven_ops"] == result["synaptic_ops"] - 1
  products = {name: r for name, r in rows.items() if name.endswith((".qk", ".av"))}
  assert len(products) == 6
  for name, r in products.items():   # T = 4 products per part; GW-SSA has a global and a local part
    assert r["both_spikes"] == r["ops"] == 4 * (1 if name.startswith("stages.3") else 2), name
  assert rows["stages.1.2.dw.conv"]["ops"] == 9                        # the depthwise multiplies are seen
  for name, r in rows.items():
    if name != "stem.conv":
      assert r["audit_sops_per_image"] == r["energy_sops_per_image"] > 0, name
  assert result["sops_match"]


@pytest.mark.slow
def test_code_integration_is_named_as_the_regrouping():
  result = _audit(spike_integration="code")
  assert result["unexpected"] == [] and result["spike_driven_ops"] == 0
  assert set(result["expected_exceptions"]) == {r["layer"] for r in result["layers"]}
  assert all(r["operands"].startswith("integer codes") for r in result["layers"] if r["layer"] != "stem.conv")


def test_products_of_integer_codes_are_caught(monkeypatch):
  """The products as they were before spike mode computed them from spikes: code times code."""
  def code_product(spec, a, b, **kw):
    return spike_einsum(spec, a.replace(integration="code"), b.replace(integration="code"), **kw)

  spike_einsum = attention.spike_einsum
  monkeypatch.setattr(attention, "spike_einsum", code_product)
  result = _audit()
  assert sorted(result["unexpected"]) == sorted(r["layer"] for r in result["layers"] if r["layer"].endswith((".qk", ".av")))
  assert len(result["unexpected"]) == 6


def test_an_stbp_network_is_a_clear_error():
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0), image_size=16, paradigm="stbp", T=2)
  with pytest.raises(ValueError, match="spike audit checks ExpG-IF spike mode; this is a 'stbp' network"):
    spike_audit.audit(model, IMAGES)
