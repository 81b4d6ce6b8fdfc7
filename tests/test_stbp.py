"""The STBP baseline paradigm: LIF dynamics, gradients through time, training on digits."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ge2mst_jax.data import pipeline as data_lib
from ge2mst_jax.evaluate import energy, report as evaluation
from ge2mst_jax.nn import models
from ge2mst_jax.spiking import stbp
from ge2mst_jax.train import loop as train_lib
from ge2mst_jax.train import sharding as shd
from tests.test_train import cross_device_ops, read_metrics, small_digits


def lif_reference(x, tau, v_th, reset):
  """The LIF recurrence written out step by step in numpy."""
  v, out = np.zeros_like(x[0]), []
  for xt in x:
    h = v + (xt - v) / tau
    s = (h >= v_th).astype(x.dtype)
    v = h - s * v_th if reset == "soft" else h * (1 - s)
    out.append(s)
  return np.stack(out)


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 3.5])
def test_lif_scan_matches_the_recurrence(reset, tau):
  x = np.random.default_rng(0).normal(1.0, 1.5, size=(6, 50)).astype(np.float64)
  with jax.enable_x64(True):
    got = np.asarray(stbp.lif_scan(jnp.asarray(x), tau=tau, v_th=1.0, reset=reset))
  np.testing.assert_array_equal(got, lif_reference(x, tau, 1.0, reset))
  assert got.sum() > 0 and got.sum() < got.size


def test_gradient_flows_back_through_time():
  # The last step's spikes depend on the first step's input only through the membrane that
  # the scan carries: a scan whose carry were cut (stop_gradient) would give exactly zero here.
  x = jnp.full((4, 3), 0.9)
  last = lambda x0: jnp.sum(stbp.lif_scan(x.at[0].set(x0), tau=2.0)[-1])
  g = jax.grad(last)(jnp.full((3,), 0.9))
  assert np.all(np.asarray(g) > 0)

  def cut_scan(x):
    def step(v, xt):
      v, s = stbp.lif_step(jax.lax.stop_gradient(v), xt, tau=2.0, v_th=1.0, reset="soft", surrogate="sigmoid",
                           alpha=4.0)
      return v, s
    return jax.lax.scan(step, jnp.zeros_like(x[0]), x)[1]

  cut = jax.grad(lambda x0: jnp.sum(cut_scan(x.at[0].set(x0))[-1]))(jnp.full((3,), 0.9))
  assert np.all(np.asarray(cut) == 0)
  # and its value is the chain rule through the recurrence: no step fires, so
  # dh_t/dh_{t-1} = (1 - 1/tau)(1 - sg(u_{t-1})) (soft reset), dh_1/dx_0 = 1/tau, times sg(u_4).
  sg = lambda u: 4 * (1 / (1 + np.exp(-4 * u))) * (1 - 1 / (1 + np.exp(-4 * u)))
  h, hs = 0.0, []
  for _ in range(4):
    h = h + (0.9 - h) / 2
    hs.append(h)
  want = sg(hs[3] - 1) * 0.5 * np.prod([0.5 * (1 - sg(u - 1)) for u in hs[:3]])
  np.testing.assert_allclose(g, want, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "atan"])
def test_surrogate_gradient_of_the_step(kind):
  u = jnp.linspace(-2, 2, 9)
  g = jax.vmap(jax.grad(lambda u: stbp.heaviside(u, kind, 4.0)))(u)
  np.testing.assert_allclose(g, stbp.surrogate_grad(u, kind, 4.0), rtol=1e-6)
  assert float(g[4]) == pytest.approx(1.0 if kind == "sigmoid" else 2.0)  # peak at the threshold
  np.testing.assert_array_equal(stbp.heaviside(u, kind, 4.0), (u >= 0).astype(u.dtype))


def test_stbp_network_modes_errors_and_energy():
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0), paradigm="stbp", T=2, image_size=16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)) * 3
  assert nnx.eval_shape(lambda m: m(x, mode="stbp"), model).shape == (2, 10)
  with pytest.raises(ValueError, match=r"'stbp' network runs in mode\(s\) \('stbp',\), not 'quantize'"):
    model(x, mode="quantize")
  expg = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0), T=2, image_size=16)
  with pytest.raises(ValueError, match="runs in mode.*not 'stbp'"):
    expg(x, mode="stbp")
  with pytest.raises(ValueError, match="paradigm='backprop'"):
    models.arch_config("ge2mst_tiny", paradigm="backprop")
  with pytest.raises(ValueError, match="lif_reset='zero'"):
    models.arch_config("ge2mst_tiny", paradigm="stbp", lif_reset="zero")
  model.eval()
  rep = energy.energy_report(model, x)
  assert rep["sops_per_image"] > 0 and 0 < rep["mean_firing_rate"] < 1
  assert {"stage2", "stage4"} <= set(rep["sops_per_stage"])
  assert any(k.endswith(".qk") for k in rep["sops_per_layer"])   # spike products are counted too


@pytest.fixture(scope="module")
def stbp_run(tmp_path_factory):
  """A short STBP training run, shared by the tests below (one worker computes it once)."""
  workdir = tmp_path_factory.mktemp("stbp")
  cfg = small_digits(30, **{"model.arch.paradigm": "stbp", "model.arch.T": 2, "optimizer.lr": 0.4})
  return cfg, workdir, train_lib.train_and_evaluate(cfg, str(workdir), quiet=True)


@pytest.mark.xdist_group("stbp_run")
@pytest.mark.slow
def test_stbp_paradigm_trains_on_digits(stbp_run):
  _, workdir, out = stbp_run
  losses = [r["loss"] for r in read_metrics(workdir)]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  assert "accuracy_stbp" in out and "accuracy_quantize" not in out and out["accuracy_stbp"] > 0.2


@pytest.mark.xdist_group("stbp_run")
@pytest.mark.slow
def test_stbp_training_on_eight_devices_stays_data_parallel(stbp_run):
  """STBP's (T, B) steps fold batch-major into each layer: the train step only sums gradients."""
  cfg, _, out = stbp_run
  setup = out["setup"]
  assert setup.mesh.devices.size == 8
  batch = shd.global_batch(next(iter(data_lib.train_dataset(cfg.data, cfg.batch_size, cfg.seed))), setup.mesh)
  assert cross_device_ops(train_lib.make_train_step(cfg, setup), out["state"], batch) == []


@pytest.mark.xdist_group("stbp_run")
@pytest.mark.slow
def test_stbp_checkpoint_evaluates_with_its_energy_report(stbp_run, tmp_path):
  cfg, workdir, trained = stbp_run
  rep = evaluation.evaluate_checkpoint(cfg, str(workdir / "checkpoints"), energy_images=8)
  # The restored checkpoint scores exactly what the network scored at the end of training.
  assert rep["paradigm"] == "stbp" and rep["accuracy_stbp"] == trained["accuracy_stbp"] and rep["accuracy_spike"] is None
  assert rep["sops_per_image"] > 0 and rep["macs_per_image"] > 0
  files = evaluation.write_report(rep, str(tmp_path / "eval"))
  assert "| accuracy stbp |" in open(files["md"]).read() and os.path.exists(files["plots"][0])
