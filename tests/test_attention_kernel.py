"""GW-SSA's Pallas training kernel (`attention_kernel`), run through Pallas's interpreter on CPU,
against the XLA path it replaces: the same forward and gradients, in the network only where it
belongs, and on a mesh without gathering the batch. (A whole network's gradients with the kernel:
test_models.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ge2mst_jax.nn import attention, models
from ge2mst_jax.nn.attention_kernel import attention_core, sharded_attention_core
from ge2mst_jax.spiking.neurons import progressive_activation


def xla_core(q, k, v, lam, alpha, kind, stride, heads, scale_log2, T, K):
  """What `SpikingAttention` computes for one part through XLA: group, attend, ungroup."""
  group, ungroup = attention.grouping(kind, stride, heads, *q.shape[1:3])
  scores = attention.exact_einsum("...gnhd,...gmhd->...ghnm", group(q), group(k)).astype(q.dtype)
  a = progressive_activation(scores * (2.0 ** -scale_log2), lam, alpha, T, K, False, "compare")
  return ungroup(attention.exact_einsum("...ghnm,...gmhd->...gnhd", a, group(v)).astype(q.dtype))


def _close(ours, theirs, tol, what):
  """Equal up to the order of float32 sums: `tol` of the largest element."""
  a, b = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(float(np.abs(b).max()), 1e-30), err_msg=what)


@pytest.mark.parametrize("dtype,kind,stride,heads,batch", [
    (jnp.float32, "local", 2, 2, 4),
    pytest.param(jnp.bfloat16, "global", 4, 1, 3, marks=pytest.mark.slow),
    # plain SSA, the whole map one group; 2 x 128 lanes, 126 padding
    pytest.param(jnp.bfloat16, None, None, 2, 130, marks=pytest.mark.slow),
])
def test_kernel_is_the_xla_attention_forward_and_backward(dtype, kind, stride, heads, batch):
  """Scores, the attention neuron (clip, blend and quantizer ends of alpha), values and every
  gradient, q/k/v and the neuron's threshold and alpha included, as the XLA path computes them."""
  keys = jax.random.split(jax.random.key(0), 4)
  # quarter-steps: many scores land exactly on the neuron's thresholds, where rounding must agree
  grid = lambda key: (jnp.round(jax.random.uniform(key, (batch, 8, 8, 8), minval=-1, maxval=1) * 4) / 4).astype(dtype)
  q, k, v = (grid(key) for key in keys[:3])
  g = jax.random.normal(keys[3], q.shape).astype(dtype)
  static = (kind, stride, heads, 1, 4, 2)
  for alpha in (0.0, 0.6, 1.0):
    args = (q, k, v, jnp.float32(1.3), jnp.float32(alpha))
    ours, ours_vjp = jax.vjp(lambda *a: attention_core(*a, *static, True), *args)
    theirs, theirs_vjp = jax.vjp(lambda *a: xla_core(*a, *static), *args)
    assert ours.dtype == theirs.dtype == dtype and float(jnp.abs(theirs.astype(jnp.float32)).max()) > 0
    # float32: sums of up to 64 products; bf16: one rounding of them. The two parameters' gradients
    # are float32 sums of a bf16 term per score, up to 10^6 of them here, and XLA:CPU may skip a bf16
    # rounding inside a fusion (--xla_allow_excess_precision, on by default; off, the bf16 threshold
    # gradients agree to 3e-7): 0.3 % apart on the 130-image case.
    tol = 1e-6 if dtype == jnp.float32 else 2.0 ** -8
    _close(ours, theirs, tol, f"forward, alpha={alpha}")
    for name, a, b in zip(("dq", "dk", "dv", "dlam", "dalpha"), ours_vjp(g), theirs_vjp(g)):
      assert a.dtype == b.dtype, name
      _close(a, b, tol if name[1] in "qkv" else 1e-4 if dtype == jnp.float32 else 1e-2, f"{name}, alpha={alpha}")
    if alpha == 0.6:   # a real blend: both parameters' gradients are live
      assert all(float(jnp.abs(t)) > 0 for t in theirs_vjp(g)[3:])


@pytest.mark.slow
def test_the_network_uses_the_kernel_in_training_only():
  """attention_kernel='interpret' puts the kernel into training's quantize mode (traced alpha), one
  forward and one backward call per attention part; evaluation (static alpha = 1, exact grids) and
  spike mode keep the XLA path, whose bit-for-bit equalities the other tests hold. (That a network
  trains the same with the kernel: test_models, the gradients test.)"""
  x = jnp.zeros((2, 16, 16, 3))
  model = models.create_model("ge2mst_tiny", 10, nnx.Rngs(0), image_size=16, attention_kernel="interpret")
  assert model.stages[1][1].attn.kernel == "interpret"

  def pallas_calls(f):   # in the traced program of f(model); nothing is compiled
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda st: f(nnx.merge(graphdef, st)))(state)).count("pallas_call")

  loss = lambda m: jnp.sum(m(x, mode="quantize", alpha=jnp.float32(0.7)) ** 2)
  assert pallas_calls(jax.grad(loss)) == 2 * 5    # forward and backward of 5 parts (2 + 2 GW-SSA, 1 SSA)
  model.eval()
  for mode in ("quantize", "spike"):
    assert pallas_calls(lambda m, mode=mode: m(x, mode=mode)) == 0, mode
  assert models.arch_config("ge2mst_tiny").compute.attention == "xla"   # 'auto' off a TPU
  with pytest.raises(ValueError, match="attention_kernel='triton'"):
    models.arch_config("ge2mst_tiny", attention_kernel="triton")


@pytest.mark.slow
def test_kernel_runs_on_each_devices_images_under_a_mesh():
  """With a mesh in context the kernel runs under shard_map on each device's share of the batch:
  no gather of the batch (XLA cannot split a kernel), the same outputs and gradients, and the
  threshold's and alpha's gradients summed over all eight devices."""
  from ge2mst_jax.train import sharding as shd
  from tests.test_train import cross_device_ops
  mesh = shd.make_mesh(2)                                   # (data 4, fsdp 2): the batch over both
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jnp.round(jax.random.uniform(key, (16, 4, 4, 8), minval=-1, maxval=1) * 4) / 4 for key in keys)
  static = ("local", 2, 2, 1, 4, 2, True)
  loss = lambda core: lambda *a: jnp.sum(core(*a, *static) ** 2)
  grad = lambda core: jax.value_and_grad(loss(core), argnums=(0, 1, 2, 3, 4))
  args = (q, k, v, jnp.float32(1.3), jnp.float32(0.6))
  want = grad(attention_core)(*args)
  batch = shd.batch_sharding(mesh, 4)
  step = jax.jit(grad(sharded_attention_core), in_shardings=(batch,) * 3 + (None, None))
  with jax.set_mesh(mesh):
    got = step(*args)
    assert cross_device_ops(step, *args) == []
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(got[1], want[1]):
    _close(a, b, 1e-5, "gradient")
  assert got[1][0].sharding.spec[0] == ("data", "fsdp")
