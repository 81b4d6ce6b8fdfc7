"""ImageNet training augmentation as timm defines it, on PIL images in the input workers:
random-resized crop (decoded at the crop's scale), flip, RandAugment and random erasing.

RandAugment is the standard op set with timm's magnitude -> parameter mappings, named by timm's
config string: Spikformer and its successors train ImageNet with `rand-m9-mstd0.5-inc1` and
random erasing 0.25 ('pixel' mode), so their numbers compare with ours only under the same
recipe. Reimplemented from timm's definitions (timm/data/auto_augment.py, random_erasing.py,
transforms.py), not imported: timm would bring in PyTorch.

Every random draw comes from the numpy Generator grain hands each record, so a record's
augmentation is a pure function of (seed, position in the stream), as the pipeline requires.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0   # magnitudes are on timm's 0..10 scale
RESAMPLE = {"bilinear": (Image.BILINEAR,), "bicubic": (Image.BICUBIC,),
            "random": (Image.BILINEAR, Image.BICUBIC)}   # timm's training default: either, per call


# ----------------------------------------------------------------------------
# The ops: (image, argument, fill colour, resample filter) -> image
# ----------------------------------------------------------------------------
def _affine(img, matrix, fill, resample):
  # PIL's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
  return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def solarize_add(img, add: int, thresh: int = 128):
  """Adds `add` (saturating at 255) to pixel values below `thresh`, leaves the others."""
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def posterize(img, bits: int):
  """Keeps the `bits` most significant bits of each value. 0 bits (magnitude 10 of the increasing
  variant) is black, as timm means it; Pillow's own posterize refuses 0 since Pillow 11."""
  mask = (0xFF << (8 - bits)) & 0xFF if bits < 8 else 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


OPS = {
    "AutoContrast": lambda img, _, fill, rs: ImageOps.autocontrast(img),
    "Equalize": lambda img, _, fill, rs: ImageOps.equalize(img),
    "Invert": lambda img, _, fill, rs: ImageOps.invert(img),
    # PIL rotates counter-clockwise about the centre, keeping the size; corners take the fill.
    "Rotate": lambda img, deg, fill, rs: img.rotate(deg, resample=rs, fillcolor=fill),
    "Posterize": lambda img, bits, fill, rs: posterize(img, bits),
    "Solarize": lambda img, thresh, fill, rs: ImageOps.solarize(img, thresh),
    "SolarizeAdd": lambda img, add, fill, rs: solarize_add(img, add),
    "Color": lambda img, f, fill, rs: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f, fill, rs: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f, fill, rs: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f, fill, rs: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": lambda img, s, fill, rs: _affine(img, (1, s, 0, 0, 1, 0), fill, rs),
    "ShearY": lambda img, s, fill, rs: _affine(img, (1, 0, 0, s, 1, 0), fill, rs),
    "TranslateXRel": lambda img, pct, fill, rs: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, rs),
    "TranslateYRel": lambda img, pct, fill, rs: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, rs),
}
GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


# ----------------------------------------------------------------------------
# Magnitude (0..10) -> the op's argument, timm's mappings
# ----------------------------------------------------------------------------
def _negate(v: float, rng: np.random.Generator) -> float:
  """Half the time -v: the signed ops (rotate, shear, translate, the increasing enhancements)."""
  return -v if rng.random() > 0.5 else v


def _posterize_bits(m, cfg, rng):
  return int(m / LEVEL_DENOM * 4)


def _solarize_thresh(m, cfg, rng):
  return min(256, int(m / LEVEL_DENOM * 256))


LEVELS = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": lambda m, cfg, rng: _negate(m / LEVEL_DENOM * 30.0, rng),                 # degrees
    "Posterize": _posterize_bits,                                                         # bits kept: 0..4
    "PosterizeIncreasing": lambda m, cfg, rng: 4 - _posterize_bits(m, cfg, rng),          # 4..0
    "Solarize": _solarize_thresh,                                                         # 0..256
    "SolarizeIncreasing": lambda m, cfg, rng: 256 - _solarize_thresh(m, cfg, rng),        # 256..0
    "SolarizeAdd": lambda m, cfg, rng: min(128, int(m / LEVEL_DENOM * 110)),              # 0..110
    "ShearX": lambda m, cfg, rng: _negate(m / LEVEL_DENOM * 0.3, rng),
    "ShearY": lambda m, cfg, rng: _negate(m / LEVEL_DENOM * 0.3, rng),
    "TranslateXRel": lambda m, cfg, rng: _negate(m / LEVEL_DENOM * cfg.translate_pct, rng),
    "TranslateYRel": lambda m, cfg, rng: _negate(m / LEVEL_DENOM * cfg.translate_pct, rng),
}
for _op in ("Color", "Contrast", "Brightness", "Sharpness"):
  # The original enhancement factor grows from 0.1 to 1.9 (so m=5 is no change); the increasing
  # variant moves away from 1 in either direction: 1 +- 0.9 m/10, kept >= 0.1.
  LEVELS[_op] = lambda m, cfg, rng: m / LEVEL_DENOM * 1.8 + 0.1
  LEVELS[_op + "Increasing"] = lambda m, cfg, rng: max(0.1, 1.0 + _negate(m / LEVEL_DENOM * 0.9, rng))

TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
              "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING = {"Posterize": "PosterizeIncreasing", "Solarize": "SolarizeIncreasing", "Color": "ColorIncreasing",
              "Contrast": "ContrastIncreasing", "Brightness": "BrightnessIncreasing",
              "Sharpness": "SharpnessIncreasing"}


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with probability
  `prob` at magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max]."""
  magnitude: float = 10.0
  num_ops: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0     # inf: uniform in [0, magnitude]
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = False
  fill: tuple = (128, 128, 128)  # what geometric ops move in: timm uses the data set's mean colour
  translate_pct: float = 0.45
  interpolation: str = "random"

  @property
  def ops(self) -> tuple:
    return tuple(INCREASING.get(n, n) if self.increasing else n for n in TRANSFORMS)

  def sample_magnitude(self, rng: np.random.Generator) -> float:
    m = self.magnitude
    if self.magnitude_std == math.inf:
      m = rng.uniform(0, m)
    elif self.magnitude_std > 0:
      m = rng.normal(m, self.magnitude_std)
    return max(0.0, min(m, self.magnitude_max))

  def apply_op(self, img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """One op, as timm's AugmentOp: skipped with probability 1 - prob, else at a sampled magnitude."""
    if self.prob < 1.0 and rng.random() > self.prob:
      return img
    level = LEVELS[name]
    arg = level(self.sample_magnitude(rng), self, rng) if level else None
    resample = RESAMPLE[self.interpolation]
    resample = resample[rng.integers(len(resample))] if name in GEOMETRIC and len(resample) > 1 else resample[0]
    return OPS[name.removesuffix("Increasing")](img, arg, self.fill, resample)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    ops = self.ops
    for k in rng.integers(len(ops), size=self.num_ops):   # with replacement, as timm draws them
      img = self.apply_op(img, ops[k], rng)
    return img


def parse_rand_augment(spec: str, **hparams) -> RandAugment:
  """timm's config string -> RandAugment: 'rand' then dash-separated m (magnitude), n (ops),
  p (probability per op), mstd (magnitude noise; > 100: uniform), mmax, inc (0/1).
  E.g. 'rand-m9-mstd0.5-inc1'. `hparams`: fill, translate_pct, interpolation."""
  head, *sections = spec.split("-")
  if head != "rand":
    raise ValueError(f"RandAugment config {spec!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5-inc1').")
  kw = {}
  for s in sections:
    match = re.fullmatch(r"([a-z]+)(\d.*)", s)
    key, val = match.groups() if match else (s, None)
    try:
      if key == "m":
        kw["magnitude"] = float(val)
      elif key == "n":
        kw["num_ops"] = int(val)
      elif key == "p":
        kw["prob"] = float(val)
      elif key == "mstd":
        kw["magnitude_std"] = math.inf if float(val) > 100 else float(val)
      elif key == "mmax":
        kw["magnitude_max"] = float(val)
      elif key == "inc":
        kw["increasing"] = int(val) != 0   # (timm takes bool() of the string, so its 'inc0' means on)
      else:
        raise KeyError
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"RandAugment config {spec!r}: unknown section {s!r}; use m<float>, n<int>, p<float>, "
                       f"mstd<float>, mmax<float>, inc<0|1> (e.g. 'rand-m9-mstd0.5-inc1').") from None
  return RandAugment(**kw, **hparams)


def mean_fill(mean) -> tuple:
  """The fill colour timm derives from the normalisation mean: round(255 m) per channel."""
  return tuple(min(255, round(255 * m)) for m in mean)


# ----------------------------------------------------------------------------
# Random-resized crop, decoded at the crop's scale; flip
# ----------------------------------------------------------------------------
def rrc_params(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random crop covering `scale` of the area at aspect ratio (w/h) in
  `ratio` (log-uniform); after 10 misses the central crop with the ratio clamped (torchvision's)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = rng.uniform(*scale) * area
    ar = math.exp(rng.uniform(*log_ratio))
    w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  if width / height < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif width / height > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image, size: int, rng: np.random.Generator, interpolation: str = "random",
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """Encoded bytes (JPEG/PNG) or a uint8 HWC array -> a `size` x `size` RGB crop.

  A JPEG is decoded at the largest DCT scale (1/1, 1/2, 1/4, 1/8: libjpeg's reduced-size
  decode, PIL's `draft`) at which the crop still has at least `size` pixels a side: a small crop
  of a large image then costs a fraction of a full decode.
  """
  img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.fromarray(np.asarray(image))
  width, height = img.size
  top, left, h, w = rrc_params(height, width, rng, scale, ratio)
  if img.format == "JPEG":
    img.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
  sx, sy = img.size[0] / width, img.size[1] / height   # 1 unless draft reduced the decode
  img = img.convert("RGB")
  resample = RESAMPLE[interpolation]
  resample = resample[rng.integers(len(resample))] if len(resample) > 1 else resample[0]
  return img.resize((size, size), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def random_flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


# ----------------------------------------------------------------------------
# Random erasing (after normalisation)
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RandomErasing:
  """timm's RandomErasing on a normalised HWC image: with probability `prob`, a rectangle of
  area fraction U(min_area, max_area) and log-uniform aspect ratio in [min_aspect, 1/min_aspect]
  is replaced by standard-normal noise per pixel ('pixel'), per channel ('rand') or zeros
  ('const'); the normalised mean of the data set is 0, so the noise is pixel-like."""
  prob: float = 0.25
  mode: str = "pixel"
  min_area: float = 0.02
  max_area: float = 1 / 3
  min_aspect: float = 0.3

  def __post_init__(self):
    if self.mode not in ("pixel", "rand", "const"):
      raise ValueError(f"Random erasing mode {self.mode!r}: use 'pixel', 'rand' or 'const'.")

  def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Erases in place (x: float HWC, the worker's own copy) and returns x."""
    if rng.random() > self.prob:
      return x
    height, width, chans = x.shape
    log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
    for _ in range(10):
      target = rng.uniform(self.min_area, self.max_area) * height * width
      ar = math.exp(rng.uniform(*log_aspect))
      h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
      if w < width and h < height:
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        shape = {"pixel": (h, w, chans), "rand": (1, 1, chans), "const": None}[self.mode]
        x[top:top + h, left:left + w] = 0.0 if shape is None else rng.standard_normal(shape, np.float32)
        break
    return x
