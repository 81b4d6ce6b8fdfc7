"""The ImageNet training augmentation against timm's definitions, op by op: the parameter each
magnitude maps to, pixel values computed by hand, known pixels moved where the affine map says,
the magnitude noise, random erasing, the crop, and the whole policy."""
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps, JpegImagePlugin

from ge2mst_jax.data import augment

FILL = (124, 116, 104)


def exact(**kw):
  """RandAugment with no randomness in magnitude or filter: what each op does at magnitude 9."""
  return augment.RandAugment(**{"magnitude": 9, "prob": 1.0, "increasing": True, "fill": FILL,
                                "interpolation": "bilinear", **kw})


def photo(h=64, w=80, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
  return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def sign_drawn(seed):
  """The sign an op seeded with `seed` draws first (timm negates when random() > 0.5)."""
  return -1 if np.random.default_rng(seed).random() > 0.5 else 1


def test_timm_recipe_string_parses_and_bad_sections_are_one_line_errors():
  ra = augment.parse_rand_augment("rand-m9-mstd0.5-inc1", fill=FILL)
  assert (ra.magnitude, ra.num_ops, ra.prob, ra.magnitude_std, ra.magnitude_max, ra.increasing, ra.fill) == \
      (9, 2, 0.5, 0.5, 10, True, FILL)
  assert ra.ops == ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
  ra = augment.parse_rand_augment("rand-n3-m7-p0.8-mmax8-mstd101-inc0")
  assert (ra.magnitude, ra.num_ops, ra.prob, ra.magnitude_max, ra.increasing) == (7, 3, 0.8, 8, False)
  assert ra.magnitude_std == float("inf") and "Posterize" in ra.ops and "Color" in ra.ops
  for bad in ("rand-m9-q3", "rand-m9-mstd", "rand-mx", "auto-m9"):
    with pytest.raises(ValueError, match=r"^RandAugment config .* \(e\.g\. 'rand-m9-mstd0\.5-inc1'\)\.$"):
      augment.parse_rand_augment(bad)
  assert augment.mean_fill((0.485, 0.456, 0.406)) == FILL    # timm's fill for ImageNet's mean


@pytest.mark.parametrize("m, expected", [
    (9, {"Rotate": 27.0, "ShearX": 0.27, "TranslateXRel": 0.405, "PosterizeIncreasing": 1, "Posterize": 3,
         "SolarizeIncreasing": 26, "Solarize": 230, "SolarizeAdd": 99, "ColorIncreasing": 0.81, "Color": 1.72}),
    (10, {"Rotate": 30.0, "PosterizeIncreasing": 0, "SolarizeIncreasing": 0, "SolarizeAdd": 110,
          "BrightnessIncreasing": 0.9}),
    (0, {"Rotate": 0.0, "PosterizeIncreasing": 4, "SolarizeIncreasing": 256, "SolarizeAdd": 0, "Sharpness": 0.1}),
])
def test_magnitude_to_argument_is_timms(m, expected):
  cfg = exact()
  for name, want in expected.items():
    got = augment.LEVELS[name](m, cfg, np.random.default_rng(1))
    if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
      got = abs(got - 1.0)     # 1 +- 0.9 m / 10: the distance from "no change"
    assert abs(got) == pytest.approx(want, abs=1e-12), name
  assert augment.LEVELS["ColorIncreasing"](10, cfg, np.random.default_rng(1)) in (pytest.approx(0.1), 1.9)


def test_pixel_ops_match_hand_computed_values():
  values = np.array([0, 25, 26, 100, 127, 128, 200, 255], np.uint8)
  img = Image.fromarray(np.repeat(values[None, :, None], 3, axis=2))
  run = lambda name, seed=0: np.asarray(exact().apply_op(img, name, np.random.default_rng(seed)))[0, :, 0].tolist()
  assert run("PosterizeIncreasing") == [0, 0, 0, 0, 0, 128, 128, 128]             # m9: 1 bit kept
  assert run("SolarizeIncreasing") == [0, 25, 229, 155, 128, 127, 55, 0]          # m9: invert values >= 26
  assert run("SolarizeAdd") == [99, 124, 125, 199, 226, 128, 200, 255]            # m9: +99 below 128, saturating
  assert run("Invert") == [255, 230, 229, 155, 128, 127, 55, 0]
  ten = lambda name: np.asarray(exact(magnitude=10).apply_op(img, name, np.random.default_rng(0)))[0, :, 0].tolist()
  assert ten("PosterizeIncreasing") == [0] * 8                                    # m10: no bit kept
  assert ten("SolarizeIncreasing") == [255, 230, 229, 155, 128, 127, 55, 0]       # m10: threshold 0
  for bits in range(1, 9):
    np.testing.assert_array_equal(np.asarray(augment.posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
  assert run("AutoContrast") == [0, 25, 26, 100, 127, 128, 200, 255]             # already spans 0..255
  stretched = Image.fromarray(np.repeat(np.array([[50, 100, 150]], np.uint8)[:, :, None], 3, axis=2))
  # 50..150 stretched to 0..255: 100 -> 2.55 * 100 - 127.5 = 127.5, which PIL's table truncates
  assert np.asarray(exact().apply_op(stretched, "AutoContrast", np.random.default_rng(0)))[0, :, 0].tolist() == \
      [0, 127, 255]


@pytest.mark.parametrize("name, reference", [
    ("ColorIncreasing", ImageEnhance.Color), ("ContrastIncreasing", ImageEnhance.Contrast),
    ("BrightnessIncreasing", ImageEnhance.Brightness), ("SharpnessIncreasing", ImageEnhance.Sharpness)])
def test_enhancements_are_pil_at_one_plus_minus_0_81(name, reference):
  img = photo()
  for seed in (0, 1, 2, 5):   # both signs
    factor = 1 + sign_drawn(seed) * 0.81
    np.testing.assert_array_equal(np.asarray(exact().apply_op(img, name, np.random.default_rng(seed))),
                                  np.asarray(reference(img).enhance(factor)))


def test_equalize_flattens_the_histogram():
  img = photo()
  out = np.asarray(exact().apply_op(img, "Equalize", np.random.default_rng(0)))
  np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(img)))
  assert out.min() == 0 and out.max() == 255


def dot_image(w, h, x, y):
  a = np.zeros((h, w, 3), np.uint8)
  a[y, x] = 255
  return Image.fromarray(a)


def where(img):
  a = np.asarray(img)[..., 0].astype(float)
  a = np.where(a > 200, a, 0)   # the dot, not the fill (124, ...)
  ys, xs = np.nonzero(a)
  return (xs * a[ys, xs]).sum() / a[ys, xs].sum(), (ys * a[ys, xs]).sum() / a[ys, xs].sum()


@pytest.mark.parametrize("seed", [0, 2])    # sign + and -
def test_geometric_ops_move_a_known_pixel_where_the_affine_says(seed):
  s = sign_drawn(seed)
  run = lambda name, img: exact().apply_op(img, name, np.random.default_rng(seed))
  # PIL's affine samples the input at (a x + b y + c, d x + e y + f): output = input moved by -offset.
  out = run("TranslateXRel", dot_image(200, 100, 100, 50))          # 0.405 * 200 = 81 px
  assert where(out) == pytest.approx((100 - s * 81, 50))
  edge = np.asarray(out)[:, 199 if s > 0 else 0]
  assert (edge == FILL).all()                                        # moved-in pixels take the fill
  assert where(run("TranslateYRel", dot_image(100, 200, 50, 100))) == pytest.approx((50, 100 - s * 81))
  # shear 0.27: x_in = x_out + 0.27 y  ->  the dot at (x, y=100) appears at x - 27 (sign +)
  assert where(run("ShearX", dot_image(200, 200, 100, 100))) == pytest.approx((100 - s * 27, 100))
  assert where(run("ShearY", dot_image(200, 200, 100, 100))) == pytest.approx((100, 100 - s * 27))
  # rotation by 27 degrees counter-clockwise about the centre: (cx + 60, cy) -> (cx + 60 cos, cy - 60 sin)
  img = Image.new("RGB", (201, 201))
  img.paste((255, 255, 255), (158, 98, 163, 103))                     # a 5x5 block centred on pixel (160, 100)
  x, y = where(run("Rotate", img))
  c, r, a = 100, 60, np.deg2rad(27 * s)                               # PIL's centre (100.5, 100.5) is pixel 100
  assert (x, y) == pytest.approx((c + r * np.cos(a), c - r * np.sin(a)), abs=0.5)


def test_magnitude_noise_is_timms_clipped_normal():
  rng = np.random.default_rng(0)
  m = np.array([augment.RandAugment(magnitude=9, magnitude_std=0.5).sample_magnitude(rng) for _ in range(20000)])
  assert m.max() == 10.0 and 6.5 < m.min()                  # N(9, 0.5) clipped to [0, 10]
  assert np.mean(m == 10.0) == pytest.approx(0.0228, abs=0.004)   # P(N(9, .5) > 10) = P(Z > 2)
  inside = m[m < 10]
  assert inside.mean() == pytest.approx(9 - 0.5 * 0.054 / 0.977, abs=0.02)   # truncated-normal mean
  u = np.array([augment.RandAugment(magnitude=9, magnitude_std=float("inf")).sample_magnitude(rng)
                for _ in range(20000)])
  assert 0 <= u.min() < 0.01 and 8.99 < u.max() <= 9 and u.mean() == pytest.approx(4.5, abs=0.1)
  assert augment.RandAugment(magnitude=9).sample_magnitude(rng) == 9.0


def test_each_op_is_applied_with_probability_half_and_chosen_uniformly(monkeypatch):
  calls = []
  ra = augment.RandAugment(magnitude=9, magnitude_std=0.5, increasing=True)
  monkeypatch.setattr(augment.RandAugment, "apply_op",
                      lambda self, img, name, rng: calls.append(name) or img)
  rng = np.random.default_rng(0)
  for _ in range(3000):
    ra(None, rng)
  counts = np.array([calls.count(n) for n in ra.ops])
  assert len(calls) == 6000 and counts.min() > 330 and counts.max() < 480   # 400 each, with replacement
  monkeypatch.undo()   # and the probability gate itself: half the calls change nothing
  rng, img = np.random.default_rng(1), photo()
  changed = [np.asarray(augment.RandAugment(magnitude=9, increasing=True).apply_op(img, "Invert", rng)).tobytes()
             != np.asarray(img).tobytes() for _ in range(2000)]
  assert np.mean(changed) == pytest.approx(0.5, abs=0.04)


def test_rrc_params_cover_timms_ranges_and_fall_back_to_a_centre_crop():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    top, left, h, w = augment.rrc_params(375, 500, rng)
    assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
    assert 0.08 * 375 * 500 * 0.97 <= h * w <= 375 * 500 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
  assert augment.rrc_params(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)   # too wide: ratio clamped to 4/3


def jpeg(img: Image.Image, quality=95) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def test_crop_is_decoded_at_its_scale_and_matches_a_full_decode():
  big = photo(800, 800, seed=3)
  data = jpeg(big)
  full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  decoded_sizes = []
  real_draft = JpegImagePlugin.JpegImageFile.draft
  def spy(self, mode, size):
    out = real_draft(self, mode, size)
    decoded_sizes.append(self.size)
    return out
  JpegImagePlugin.JpegImageFile.draft = spy
  try:
    for seed in range(20):
      out = augment.random_resized_crop(data, 64, np.random.default_rng(seed), interpolation="bilinear")
      top, left, h, w = augment.rrc_params(800, 800, np.random.default_rng(seed))
      ref = Image.fromarray(full).resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h))
      assert out.size == (64, 64) and out.mode == "RGB"
      # a reduced-size DCT decode is not bit-equal to a full decode resized: a few levels of 255 apart,
      # where another crop of the same image is tens of levels away
      assert np.abs(np.asarray(out, float) - np.asarray(ref, float)).mean() < 6
      assert np.abs(np.asarray(out, float) - np.asarray(ref, float)[::-1]).mean() > 20
  finally:
    JpegImagePlugin.JpegImageFile.draft = real_draft
  assert min(decoded_sizes) < (800, 800)                          # small crops took a reduced decode
  arr = augment.random_resized_crop(np.asarray(big), 64, np.random.default_rng(0))   # decoded arrays too
  assert arr.size == (64, 64)


def test_random_erasing_puts_normal_noise_in_one_rectangle():
  rng = np.random.default_rng(0)
  er = augment.RandomErasing(prob=1.0)
  areas = []
  for _ in range(200):
    x = er(np.full((64, 64, 3), 7.0, np.float32), rng)
    ys, xs = np.nonzero((x != 7.0).any(-1))
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert (x[ys.min():ys.max() + 1, xs.min():xs.max() + 1] != 7.0).all()   # a full rectangle
    areas.append(h * w / 64 / 64)
  noise = np.concatenate([er(np.full((64, 64, 3), 7.0, np.float32), rng)[..., 0].ravel() for _ in range(50)])
  noise = noise[noise != 7.0]
  assert noise.mean() == pytest.approx(0, abs=0.05) and noise.std() == pytest.approx(1, abs=0.05)
  assert 0.015 < min(areas) and max(areas) < 0.36 and np.mean(areas) == pytest.approx((0.02 + 1 / 3) / 2, abs=0.03)
  erased = [(augment.RandomErasing(prob=0.25)(np.zeros((32, 32, 3), np.float32), rng) != 0).any() for _ in range(2000)]
  assert np.mean(erased) == pytest.approx(0.25, abs=0.03)
  assert (augment.RandomErasing(prob=1.0, mode="const")(np.ones((32, 32, 3), np.float32), rng) == 0).any()
  with pytest.raises(ValueError, match="Random erasing mode 'noise': use 'pixel', 'rand' or 'const'."):
    augment.RandomErasing(mode="noise")


def test_whole_policy_is_uint8_of_the_crop_size_and_a_function_of_the_seed():
  data = jpeg(photo(375, 500, seed=4), quality=90)
  ra = augment.parse_rand_augment("rand-m9-mstd0.5-inc1", fill=FILL)

  def policy(seed):
    rng = np.random.default_rng(seed)
    return np.asarray(ra(augment.random_flip(augment.random_resized_crop(data, 96, rng), rng), rng))

  outs = [policy(s) for s in range(12)]
  assert all(o.shape == (96, 96, 3) and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(policy(5), outs[5])
  assert len({o.tobytes() for o in outs}) == 12


@pytest.mark.parametrize("increasing", [True, False])
def test_every_op_runs_at_every_magnitude(increasing):
  img = photo(32, 40)
  for m in np.linspace(0, 10, 21):
    ra = exact(magnitude=float(m), increasing=increasing, interpolation="random")
    for name in ra.ops:
      out = ra.apply_op(img, name, np.random.default_rng(0))
      assert out.size == img.size and out.mode == "RGB", (name, m)
