"""SOP counting, firing rates and energy against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ge2mst_jax.nn import attention, blocks, models
from ge2mst_jax.evaluate import energy
from ge2mst_jax.spiking.forward import Forward
from ge2mst_jax.spiking.neurons import SpikeTrain

# The tests share a module fixture: one worker computes it once.
pytestmark = pytest.mark.xdist_group("tiny_energy")


def _layer_sops(layer, train):
  _, flat = energy.capture_stats(lambda m, x: m(x, Forward.of("spike", collect=True)), layer, train)
  return {k[-1]: float(v) for k, v in flat.items()}


def test_linear_layer_sops_hand_computed():
  layer = blocks.SynapticConv(3, 5, 1, rngs=nnx.Rngs(0))
  spikes = np.zeros((2, 1, 2, 2, 3), np.float32)   # T=2, B=1, 2x2 tokens, 3 channels
  spikes[0, 0, 0, 0, [0, 2]] = 1                    # two spikes at step 1
  spikes[1, 0, 1, 1, 1] = 1                         # one at step 2
  out = _layer_sops(layer, SpikeTrain(jnp.asarray(spikes), jnp.float32(0.5)))
  assert out["sops"] == 3 * 5                        # each spike reaches all 5 outputs once
  assert out["macs"] == 2 * 2 * 5 * 3                # dense: 4 positions x 5 outputs x 3 inputs


def test_conv_sops_respect_borders_stride_and_groups():
  spikes = np.zeros((1, 1, 4, 4, 2), np.float32)
  spikes[0, 0, 0, 0, 0] = 1      # corner spike: a 3x3 'same' conv reaches 2x2 outputs
  spikes[0, 0, 1, 1, 1] = 1      # interior spike: reaches 3x3 outputs
  train = SpikeTrain(jnp.asarray(spikes), jnp.float32(1.0))
  dense = blocks.SynapticConv(2, 3, 3, rngs=nnx.Rngs(0))
  assert _layer_sops(dense, train)["sops"] == (4 + 9) * 3
  depthwise = blocks.SynapticConv(2, 2, 3, groups=2, rngs=nnx.Rngs(0))
  assert _layer_sops(depthwise, train)["sops"] == (4 + 9) * 1
  strided = blocks.SynapticConv(2, 3, 3, stride=2, rngs=nnx.Rngs(0))
  # outputs at rows/cols {0, 2}: the corner spike reaches (0,0); (1,1) reaches (0,0),(0,2),(2,0),(2,2)
  assert _layer_sops(strided, train)["sops"] == (1 + 4) * 3


@pytest.mark.parametrize("kernel,stride,groups", [(1, 1, 1), (3, 2, 1), (3, 1, 6)])
def test_code_integration_same_sum_and_same_sops(kernel, stride, groups):
  """`integration='code'` regroups `sum_t theta_t (W s_t)` as `W (sum_t theta_t s_t)`: the same
  output up to float rounding, and the same SOPs, which are counted from the spikes."""
  layer = blocks.SynapticConv(6, 6, kernel, stride, groups, rngs=nnx.Rngs(0))
  layer.eval()
  rng = np.random.default_rng(0)
  spikes = jnp.asarray(rng.choice([-1.0, 0.0, 1.0], size=(4, 2, 7, 7, 6), p=[0.2, 0.5, 0.3]), jnp.float32)
  steps = _layer_sops(layer, SpikeTrain(spikes, jnp.float32(0.125)))
  code = _layer_sops(layer, SpikeTrain(spikes, jnp.float32(0.125), "code"))
  assert steps == code and steps["sops"] > 0
  y_steps = layer(SpikeTrain(spikes, jnp.float32(0.125)), Forward.of("spike"))
  y_code = layer(SpikeTrain(spikes, jnp.float32(0.125), "code"), Forward.of("spike"))
  assert y_code.shape == y_steps.shape
  np.testing.assert_allclose(y_code, y_steps, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(y_steps))) > 0.1


def test_spike_product_sops_count_spike_pairs():
  a = np.zeros((2, 1, 2, 3), np.float32)   # T=2, batch 1, 2 tokens, 3 channels
  b = np.zeros((2, 1, 2, 3), np.float32)
  a[0, 0, 0, 0] = a[1, 0, 0, 0] = 1        # token 0, channel 0 fires twice (code 3)
  b[0, 0, 1, 0] = 1                         # key 1, channel 0 fires once
  b[1, 0, 0, 2] = -1                        # key 0, channel 2: no partner in a
  owner = blocks.SynapticConv(1, 1, rngs=nnx.Rngs(0))
  product = lambda m, a, b: attention.spike_einsum("bnd,bmd->bnm", a, b, sow_to=m, name="qk")
  out, flat = energy.capture_stats(product, owner, SpikeTrain(jnp.asarray(a), jnp.float32(0.25)),
                                   SpikeTrain(jnp.asarray(b), jnp.float32(0.5)))
  stats = {k[-1]: float(v) for k, v in flat.items()}
  assert stats["qk_sops"] == 2 * 1                          # two a-spikes meet one b-spike
  np.testing.assert_allclose(out[0], [[0.0, 3 * 0.25 * 2 * 0.5], [0.0, 0.0]])


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0))
  model.eval()
  return model


@pytest.mark.slow
def test_zero_input_gives_zero_sops_and_energy_is_0_9_pj(tiny):
  # all-zero images still excite neurons through BN biases; feeding zero *spikes* must cost nothing
  layer = blocks.SynapticConv(4, 4, 3, rngs=nnx.Rngs(0))
  assert _layer_sops(layer, SpikeTrain(jnp.zeros((4, 1, 5, 5, 4)), jnp.float32(1.0)))["sops"] == 0
  rep = energy.energy_report(tiny, jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
  assert rep["sops_per_image"] > 0
  assert rep["energy_mj_per_image"] == pytest.approx(0.9e-9 * rep["sops_per_image"], rel=1e-12)
  assert rep["sops_per_image"] == pytest.approx(sum(rep["sops_per_stage"].values()), rel=1e-9)
  assert rep["sops_per_image"] == pytest.approx(sum(rep["sops_per_block"].values()), rel=1e-9)
  assert "stem" not in rep["sops_per_stage"] and rep["stem_macs_per_image"] == 32 * 32 * 16 * 3 * 3 * 3
  assert rep["stem_energy_mj_per_image"] == pytest.approx(4.6e-9 * rep["stem_macs_per_image"])
  assert all(0 <= r <= 1 for r in rep["firing_rates"].values()) and len(rep["firing_rates"]) > 20


@pytest.mark.slow
def test_dense_macs_are_those_of_the_quantize_mode_forward(tiny):
  """The report's MACs (the ANN the network is) are what a quantize-mode pass over the same images
  sows, not spike mode's: its classifier runs on each of the 4x4 tokens before pooling."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  rep = energy.energy_report(tiny, x)
  _, quantize = energy.instrumented_forward(tiny, x, mode="quantize")
  _, spike = energy.instrumented_forward(tiny, x, mode="spike")
  macs = lambda flat: {k: float(v) for k, v in flat.items() if k[-1] == "macs"}
  assert macs(quantize)[("classifier", "macs")] == 128 * 10 and macs(spike)[("classifier", "macs")] == 16 * 128 * 10
  assert rep["macs_per_image"] == sum(v for k, v in jax.device_get(quantize).items() if k[-1].endswith("macs"))
  assert rep["macs_per_image"] < sum(v for k, v in jax.device_get(spike).items() if k[-1].endswith("macs"))
  shapes_only = energy.model_macs(tiny, (32, 32, 3))
  assert {k: rep[k] for k in shapes_only} == shapes_only


@pytest.mark.slow
def test_sops_scale_with_batch_as_documented(tiny):
  """Layers sow batch totals; the report divides by the batch: duplicated images, same per-image SOPs."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  one = energy.energy_report(tiny, x)
  two = energy.energy_report(tiny, jnp.concatenate([x, x]))
  assert two["sops_per_image"] == pytest.approx(one["sops_per_image"], rel=1e-6)
  _, flat1 = energy.instrumented_forward(tiny, x)
  _, flat2 = energy.instrumented_forward(tiny, jnp.concatenate([x, x]))
  key = next(k for k in flat1 if k[-1] == "sops")
  assert float(flat2[key]) == pytest.approx(2 * float(flat1[key]))


def test_small_model_macs_at_224(tiny):
  """MACs depend on shapes alone: an abstract model (no weights allocated) counts them, and counts
  what the model with weights does."""
  model = nnx.eval_shape(lambda: models.create_model("ge2mst_small", 1000, nnx.Rngs(0)))
  macs = energy.model_macs(model, (224, 224, 3))
  abstract_tiny = nnx.eval_shape(lambda: models.create_model("ge2mst_tiny", 10, nnx.Rngs(0)))
  assert energy.model_macs(abstract_tiny, (32, 32, 3)) == energy.model_macs(tiny, (32, 32, 3))
  print(f"ge2mst_small @224: {macs['macs_per_image'] / 1e9:.3f} G MACs, {macs['flops_per_image'] / 1e9:.3f} GFLOPs")
  assert macs["stem_macs_per_image"] == 112 * 112 * 32 * 7 * 7 * 3
  assert 0.5e9 < macs["macs_per_image"] < 3e9
