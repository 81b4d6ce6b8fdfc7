"""ExpG-IF: level sets, lossless spike emission, gradients, schedule, transforms."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from ge2mst_jax.spiking import neurons as nr
from ge2mst_jax.spiking.forward import Forward

TK = [(T, K) for T in range(1, 9) for K in range(1, T + 1)]
emit = jax.jit(nr.expg_spikes, static_argnums=(2, 3, 4))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def quantize_and_emit(x, lam, T: int, K: int, symmetric: bool):
  """The quantizer, the emitter (spikes, thetas) and the IF scan emitter's spikes, as one program:
  the tests compare the three for 72 (T, K, sign) cases, and a compile's fixed cost (~0.09 s
  here) is most of each of these small programs' (216 compiles -> 72)."""
  return (nr.expg_quantize(x, lam, T, K, symmetric), *nr.expg_spikes(x, lam, T, K, symmetric),
          nr.expg_spikes(x, lam, T, K, symmetric, emitter="scan")[0])


def _probe_inputs(lam, T, K, n=257, seed=0, size=2048):
  """Random values plus every exact threshold, values beyond lam, negatives and zeros.

  At least `n` random values, as many as make the total `size` for every (T, K): eager
  operations compile once per shape, so one shape for all lets the tests' dozens of (T, K)
  share their compiles."""
  rng = np.random.default_rng(seed)
  ls = nr.expg_levels(T, K)
  lam32 = np.float32(lam)
  thr = (lam32 * ls.thresholds.astype(np.float32)).astype(np.float32)
  lv = (lam32 * ls.levels.astype(np.float32)).astype(np.float32)
  exact = [thr, np.nextafter(thr, -np.inf), np.nextafter(thr, np.inf), lv, -lv, -thr,
           [0.0, -0.0, lam, 2 * lam, 1e6, -1e6, np.inf, -np.inf]]
  random = size - sum(map(len, exact))
  assert random >= n, f"size={size} leaves {random} < {n} random values for T={T}, K={K}"
  return jnp.asarray(np.concatenate([rng.uniform(-0.5 * lam, 1.5 * lam, random), *exact]).astype(np.float32))


def test_levels_match_spec_examples():
  assert nr.expg_levels(4, 2).codes.tolist() == [0, 1, 2, 3, 4, 6, 8, 9, 12]
  assert nr.expg_levels(4, 2).Z == 12
  assert nr.expg_levels(4, 1).codes.tolist() == [0, 1, 2, 4, 8]          # Exp-IF
  assert nr.expg_levels(4, 4).codes.tolist() == list(range(16))           # uniform binary
  assert nr.groups(4, 2) == [[8, 2], [4, 1]]


@pytest.mark.parametrize("T,K", TK)
def test_level_counts_and_patterns(T, K):
  ls = nr.expg_levels(T, K)
  assert len(ls.codes) == math.prod(len(g) + 1 for g in nr.groups(T, K))
  assert np.all(np.diff(ls.codes) > 0) and ls.codes[0] == 0 and ls.levels[-1] == 1.0
  # each pattern is the binary expansion of its code and uses at most one base per group
  np.testing.assert_array_equal(ls.patterns @ nr.step_bases(T), ls.codes)
  assert ls.patterns.sum(1).max() == K if T > 0 else True
  step_group = np.arange(T) % K
  for p in ls.patterns:
    assert np.all(np.bincount(step_group[p > 0], minlength=K) <= 1)


@pytest.mark.parametrize("T,K", TK)
@pytest.mark.parametrize("symmetric", [False, True])
def test_spikes_decode_bitwise_to_quantizer(T, K, symmetric):
  for seed, lam in enumerate([0.37, 1e-3, 123.25]):
    x = _probe_inputs(lam, T, K, seed=seed)
    q, spikes, thetas, scanned = quantize_and_emit(x, lam, T, K, symmetric)
    assert spikes.shape == (T, *x.shape)
    # the vectorised emitter reads the digits the IF scan with soft reset fires
    np.testing.assert_array_equal(spikes, scanned)
    allowed = {-1.0, 0.0, 1.0} if symmetric else {0.0, 1.0}
    assert set(np.unique(np.asarray(spikes)).tolist()) <= allowed
    code = np.tensordot(2 ** np.arange(T - 1, -1, -1), np.asarray(spikes), axes=1)
    decoded = code.astype(np.float32) * (np.float32(lam) * np.float32(1 / nr.expg_levels(T, K).Z))
    np.testing.assert_array_equal(decoded.view(np.int32), np.asarray(q).view(np.int32))
    st_ = nr.SpikeTrain(spikes, nr.code_scale(lam, T, K))
    np.testing.assert_array_equal(np.asarray(st_.decode()).view(np.int32), np.asarray(q).view(np.int32))
    np.testing.assert_allclose(jnp.tensordot(thetas, spikes, axes=1), q, rtol=1e-6, atol=0)
    assert int(jnp.abs(spikes).sum(0).max()) <= K
    # the quantizer is a nearest level of the clipped input (exact ties round up)
    a = np.abs(np.asarray(x, np.float64)) if symmetric else np.asarray(x, np.float64)
    finite = np.isfinite(a)
    u = np.clip(a[finite] / lam, 0, 1)
    levels = nr.expg_levels(T, K).levels
    chosen = np.abs(np.asarray(q, np.float64))[finite] / lam
    best = np.min(np.abs(u[:, None] - levels[None]), axis=1)
    assert np.all(np.abs(u - chosen) <= best + 1e-5)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 8), data=st.data(), lam=st.floats(1e-3, 1e3),
       xs=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64), symmetric=st.booleans())
def test_lossless_property(T, data, lam, xs, symmetric):
  K = data.draw(st.integers(1, T))
  x = jnp.asarray(xs + [0.0] * (2048 - len(xs)), jnp.float32)  # _probe_inputs' shape: its (T, K) compiles serve
  q, spikes, _, _ = quantize_and_emit(x, lam, T, K, symmetric)
  dec = nr.SpikeTrain(spikes, nr.code_scale(lam, T, K)).decode()
  assert np.array_equal(np.asarray(dec).view(np.int32), np.asarray(q).view(np.int32))
  assert int(jnp.abs(spikes).sum(0).max()) <= K


def test_exp_if_fires_at_most_once():
  x = jax.random.uniform(jax.random.key(1), (4096,), minval=-1, maxval=3)
  for T in range(1, 9):
    spikes, _ = emit(x, 1.0, T, 1)
    assert int(spikes.sum(0).max()) == 1


def test_search_and_compare_methods_agree():
  x = _probe_inputs(0.8, 6, 3)
  np.testing.assert_array_equal(nr.expg_code(x, 0.8, 6, 3, "search"), nr.expg_code(x, 0.8, 6, 3, "compare"))
  lam = jnp.linspace(0.5, 2.0, x.shape[0])   # a threshold per element
  np.testing.assert_array_equal(nr.expg_code(x, lam, 6, 3, "search"), nr.expg_code(x, lam, 6, 3, "compare"))
  with pytest.raises(ValueError, match="Unknown expg_code method 'bisect'"):
    nr.expg_code(x, 0.8, 6, 3, "bisect")


ARITH_TK = [(T, K) for T in range(1, 17) for K in sorted({1, 2, T}) if K <= T and (K <= 2 or T <= 8)]


@functools.partial(jax.jit, static_argnums=(2, 3))
def arith_and_chain(x, lam, T: int, K: int):
  """Both searches as one program: one compile per (T, K) and lam's shape (see quantize_and_emit)."""
  return nr.expg_code(x, lam, T, K, "arith"), nr.expg_code(x, lam, T, K, "compare")


@pytest.mark.parametrize("T,K", ARITH_TK)
def test_arithmetic_level_search_equals_comparison_chain(T, K):
  """The bit-arithmetic search gives the chain's integers everywhere: random values, values a
  float step either side of every threshold and level, clipping, NaN and infinities, scalar
  or per-element lam, under jit (which may rewrite arithmetic) and eagerly."""
  xs = [_probe_inputs(lam, T, K, n=2000, seed=T, size=4096) for lam in (0.37, 1.0, 3.3)]
  x = jnp.concatenate(xs + [jnp.asarray([np.nan, -np.nan], jnp.float32)])
  lams = jnp.concatenate([jnp.full((len(v),), lam, jnp.float32) for v, lam in zip(xs, (0.37, 1.0, 3.3))] +
                         [jnp.ones((2,), jnp.float32)])
  for lam in (lams, jnp.float32(0.37)):
    arith, want = arith_and_chain(x, lam, T, K)
    np.testing.assert_array_equal(arith, want)
    np.testing.assert_array_equal(nr.expg_code(x, lam, T, K, "arith"), want)
  assert set(np.unique(np.asarray(want))) == set(nr.expg_levels(T, K).codes.tolist())  # every level reached
  if (T, K) == (8, 2):
    with jax.enable_x64(True):
      x64 = x.astype(jnp.float64) * (1 + 1e-12)   # values float32 cannot hold
      arith, want = arith_and_chain(x64, 1.0, T, K)
      np.testing.assert_array_equal(arith, want)
      np.testing.assert_array_equal(nr.expg_code(x64, 1.0, T, K, "arith"), want)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_straight_through_and_lambda(symmetric):
  lam = 1.5
  x = jnp.asarray([-3.0, -1.0, -0.2, 0.1, 0.7, 1.2, 1.5, 2.0, 5.0])
  gx = jax.grad(lambda x: nr.expg_quantize(x, lam, 4, 2, symmetric).sum())(x)
  a = jnp.abs(x) if symmetric else x
  np.testing.assert_array_equal(gx, jnp.where((a >= 0) & (a <= lam), 1.0, 0.0))
  data = jax.random.normal(jax.random.key(0), (512,))
  glam = jax.grad(lambda l: jnp.sum(nr.expg_quantize(data, l, 4, 2, symmetric) ** 2))(lam)
  assert np.isfinite(glam) and glam != 0
  # d/dlam of a fully saturated neuron is exactly its level: 1 (times sign)
  sat = jnp.asarray([10.0, -10.0])
  g_sat = jax.grad(lambda l: nr.expg_quantize(sat, l, 4, 2, symmetric).sum())(lam)
  assert float(g_sat) == (0.0 if symmetric else 1.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_are_finite_differences_where_defined(symmetric):
  """Central differences against `jax.grad`, element by element, in float64.

  Where Q is differentiable (saturated above lam, or at zero below the one-sided range) the
  differences are taken of Q itself. Inside the range Q is piecewise constant; its gradient is
  that of the straight-through (LSQ) surrogate `lam * (x/lam + stop_gradient(q - x/lam))`, whose
  differences are taken with the rounding residual `q - x/lam` held at its value at the point.
  """
  T, K, lam, h, margin = 4, 2, 1.3, 1e-4, 1e-2
  with jax.enable_x64(True):
    x = jax.random.uniform(jax.random.key(0), (400,), jnp.float64, -2.5 * lam, 2.5 * lam)
    a = jnp.abs(x) if symmetric else x
    x = x[(jnp.abs(a - lam) > margin) & (jnp.abs(x) > margin)]   # off the kinks at 0 and lam
    Q = lambda x, l: nr.expg_quantize(x, l, T, K, symmetric)
    gx = jax.vmap(jax.grad(Q, 0), (0, None))(x, jnp.float64(lam))
    glam = jax.vmap(jax.grad(Q, 1), (0, None))(x, jnp.float64(lam))
    sign = jnp.sign(x) if symmetric else jnp.ones_like(x)
    a = jnp.abs(x) if symmetric else x
    inside = (a > 0) & (a < lam)
    residual = Q(x, lam) / (sign * lam) - a / lam                  # q - |x|/lam at the point, frozen
    surrogate = lambda x, l: jnp.sign(x) * (jnp.abs(x) + l * residual) if symmetric else x + l * residual
    f = lambda x, l: jnp.where(inside, surrogate(x, l), Q(x, l))
    fd_x = (f(x + h, lam) - f(x - h, lam)) / (2 * h)
    fd_lam = (f(x, lam + h) - f(x, lam - h)) / (2 * h)
    assert int(inside.sum()) > 50 and int((a > lam).sum()) > 50                      # both regions probed
  np.testing.assert_allclose(gx, fd_x, atol=1e-8)
  np.testing.assert_allclose(glam, fd_lam, atol=1e-8)


@pytest.mark.parametrize("symmetric", [False, True])
def test_progressive_activation_end_points_exact(symmetric):
  x = _probe_inputs(1.2, 4, 2)[:-2]  # drop +-inf (0 * inf is nan in any blend)
  q = nr.expg_quantize(x, 1.2, 4, 2, symmetric)
  clip = jnp.clip(x, -1.2 if symmetric else 0, 1.2)
  for alpha in (1.0, jnp.float32(1.0)):
    out = nr.progressive_activation(x, 1.2, alpha, 4, 2, symmetric)
    np.testing.assert_array_equal(np.asarray(out).view(np.int32), np.asarray(q).view(np.int32))
  for alpha in (0.0, jnp.float32(0.0)):
    out = nr.progressive_activation(x, 1.2, alpha, 4, 2, symmetric)
    np.testing.assert_array_equal(np.asarray(out).view(np.int32), np.asarray(clip).view(np.int32))
  mid = nr.progressive_activation(x, 1.2, 0.25, 4, 2, symmetric)
  np.testing.assert_allclose(mid, 0.75 * clip + 0.25 * q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_blend_vjp_is_the_autodiff_of_its_formula(symmetric):
  """Training's traced-alpha activation has one custom VJP that keeps only x for the backward
  pass; its gradients (x, lam, alpha) are those autodiff gives the formula written out."""
  def reference(x, lam, alpha):
    lam_x = jnp.asarray(lam, x.dtype)
    clipped = jnp.clip(x, -lam_x if symmetric else 0, lam_x)
    return (1 - alpha) * clipped + alpha * nr.expg_quantize(x, lam, 4, 2, symmetric)

  # away from the clip bounds and the thresholds, where both are differentiable
  x = jnp.concatenate([jnp.linspace(-2.3, 2.3, 201), jnp.asarray([-3.1, 3.3])])
  lam = jnp.float32(1.3)
  for alpha in (0.0, 0.37, 1.0):
    out = lambda x, l, a: nr.progressive_activation(x, l, a, 4, 2, symmetric)
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32))
    f = lambda fn: lambda x, l, a: jnp.sum(weights * fn(x, l, a))
    got = jax.jit(jax.grad(f(out), argnums=(0, 1, 2)))(x, lam, jnp.float32(alpha))
    want = jax.grad(f(reference), argnums=(0, 1, 2))(x, lam, jnp.float32(alpha))
    np.testing.assert_array_equal(out(x, lam, jnp.float32(alpha)), reference(x, lam, alpha) if 0 < alpha < 1
                                  else out(x, lam, alpha))
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    if 0 < alpha < 1:
      np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    assert float(got[1]) != 0


def _reference_alpha(step, total_steps, kind, ramp_end, power):
  """The hand-written ramp the optax schedule replaced, as the train step called it."""
  r = jnp.clip(step / total_steps / ramp_end, 0.0, 1.0)
  return {"linear": r, "cosine": 0.5 * (1 - jnp.cos(jnp.pi * r)), "poly": r ** power,
          "constant": jnp.ones_like(r)}[kind]


@pytest.mark.parametrize("kind,power", [("linear", 1.0), ("cosine", 1.0), ("constant", 1.0), ("poly", 1.0),
                                        ("poly", 0.5), ("poly", 2.0), ("poly", 3.0)])
def test_alpha_schedule_matches_the_hand_written_ramp(kind, power):
  # Ramps of 0.8, 2.4, 9.25, 0.15, 800 steps...: whole and fractional lengths, shorter than a step.
  step = jnp.arange(1003, dtype=jnp.uint32)   # the optimizer's count, past the last step too; one shape
  for total in (1, 3, 10, 25, 1000):           # for all, so that the eager ops compile once
    for ramp_end in (1.0, 0.8, 0.37, 0.05):
      # 'constant' is optax's constant_schedule: a Python 1.0 whatever the step.
      got = np.broadcast_to(nr.alpha_schedule(total, kind, ramp_end, power)(step), step.shape)
      want = np.asarray(_reference_alpha(step, total, kind, ramp_end, power))
      case = f"total_steps={total}, ramp_end={ramp_end}"
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=case)
      # Both ends exactly: only alpha = 0 is ClipReLU and alpha = 1 the quantizer bit for bit.
      np.testing.assert_array_equal(got[np.arange(1003) >= ramp_end * total], 1.0, err_msg=case)
      assert got[0] == (1.0 if kind == "constant" else 0.0), case
      assert np.all(np.diff(got) >= 0), case


def test_alpha_schedule_values_and_errors():
  np.testing.assert_allclose(nr.alpha_schedule(10)(jnp.asarray([0, 4, 8, 10])), [0, 0.5, 1, 1])
  np.testing.assert_allclose(nr.alpha_schedule(10, ramp_end=1.0)(5), 0.5)       # e/E
  np.testing.assert_allclose(nr.alpha_schedule(10, "cosine")(4), 0.5, atol=1e-6)
  for args, match in [((10, "exp"), "Unknown alpha schedule 'exp': use 'linear'"), ((10, "linear", 0.0), "ramp_end"),
                      ((10, "cosine", 1.5), "ramp_end=1.5 is outside"), ((0,), "total_steps=0")]:
    with pytest.raises(ValueError, match=match) as e:
      nr.alpha_schedule(*args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("T,K", [(0, 1), (4, 0), (4, 5), (17, 1), (2.5, 1)])
def test_bad_t_k_errors(T, K):
  with pytest.raises(ValueError, match="out of range"):
    nr.expg_levels(T, K)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_vmap_grad_shapes_dtypes(dtype):
  x = (jax.random.normal(jax.random.key(2), (3, 5, 7)) * 2).astype(dtype)
  q = jax.jit(nr.expg_quantize, static_argnums=(2, 3, 4))(x, 1.0, 4, 2, True)
  assert q.shape == x.shape and q.dtype == dtype
  s, th = jax.jit(nr.expg_spikes, static_argnums=(2, 3))(x, 1.0, 4, 2)
  assert s.shape == (4, 3, 5, 7) and s.dtype == dtype and th.dtype == dtype
  dec = nr.SpikeTrain(s, nr.code_scale(1.0, 4, 2, dtype)).decode()
  np.testing.assert_array_equal(np.asarray(dec, np.float32), np.asarray(nr.expg_quantize(x, 1.0, 4, 2), np.float32))
  vq = jax.vmap(lambda r, l: nr.expg_quantize(r, l, 4, 2))(x.astype(jnp.float32), jnp.asarray([0.5, 1.0, 2.0]))
  assert vq.shape == x.shape
  vs, _ = jax.vmap(lambda r: nr.expg_spikes(r, 1.0, 4, 2))(x)
  assert vs.shape == (3, 4, 5, 7)
  g = jax.grad(lambda x: nr.progressive_activation(x, 1.0, 0.3, 4, 2).astype(jnp.float32).sum())(x)
  assert g.shape == x.shape and g.dtype == dtype
  ga = jax.jit(jax.grad(lambda a: nr.progressive_activation(x.astype(jnp.float32), 1.0, a, 4, 2).sum()))(0.5)
  assert np.isfinite(ga)


def test_nnx_neuron_modes():
  n = nr.ExpGIF(T=4, K=2, lam_init=1.5)
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4)) * 2
  q = n(x, Forward.of("quantize", alpha=1.0))
  train = n(x, Forward.of("spike"))
  assert isinstance(train, nr.SpikeTrain) and train.spikes.shape == (4, 2, 8, 8, 4)
  np.testing.assert_array_equal(train.decode(), q)
  grads = nnx.grad(lambda m: jnp.sum(m(x, Forward.of("quantize", alpha=0.5)) ** 2))(n)
  assert float(grads.lam[...]) != 0
  with pytest.raises(ValueError, match="Unknown mode 'ann'"):
    n(x, Forward.of("ann"))
  with pytest.raises(ValueError, match="mode='stbp' needs LIF neurons"):
    n(x, Forward.of("stbp"))
  sym = nr.ExpGIF(T=3, K=3, symmetric=True)
  assert set(np.unique(sym(x, Forward.of("spike")).spikes).tolist()) == {-1.0, 0.0, 1.0}


def test_grid_codes_recovers_every_code_and_differentiates_as_a_division():
  """Quantize mode at alpha = 1 feeds synapses `grid_codes(Q(x), lam / Z)`: every code of every
  level comes back exactly (bf16 operands need exact integers), and its derivative is `q / unit`'s."""
  for T, K in ((4, 2), (8, 2), (3, 1)):
    lam = jnp.float32(0.8137)
    unit = nr.code_scale(lam, T, K)
    codes = jnp.asarray(nr.expg_levels(T, K).codes, jnp.float32)
    q = nr.expg_quantize(codes * unit * (1 + 1e-7), lam, T, K)        # the quantizer's own outputs
    np.testing.assert_array_equal(nr.grid_codes(q, unit), codes)
    np.testing.assert_array_equal(nr.grid_codes(-q, unit), -codes)
  q, unit, dq, du = jnp.float32(3 * 0.1), jnp.float32(0.1), jnp.float32(0.5), jnp.float32(0.25)
  _, tangent = jax.jvp(nr.grid_codes, (q, unit), (dq, du))
  _, expected = jax.jvp(lambda a, b: a / b, (q, unit), (dq, du))
  np.testing.assert_allclose(tangent, expected, rtol=1e-6)
