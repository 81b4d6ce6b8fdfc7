"""Deterministic image transforms in numpy: the evaluation transform of a config, shared by the
input pipeline (in its workers) and by anyone who runs a loaded model on their own images.

A checkpoint's normalisation and resize/crop policy live in its config; `eval_transform(cfg)`
rebuilds them, so a model scores in another pipeline what it scored in ours:

  model, cfg = ge2mst_jax.load("digits.safetensors")
  logits = model(ge2mst_jax.eval_transform(cfg)(uint8_images), mode="spike")
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

MEAN = {"digits": (0.5,) * 3, "imagenet": (0.485, 0.456, 0.406), "cifar": (0.4914, 0.4822, 0.4465)}
STD = {"digits": (0.5,) * 3, "imagenet": (0.229, 0.224, 0.225), "cifar": (0.2470, 0.2435, 0.2616)}
CENTER_CROP = 0.875   # ImageNet evaluation: the central 87.5 % of the shorter side, then resize


def resize(img: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of an HWC uint8/float image to `size` x `size` float32 (no TensorFlow, no PIL
  needed), separably: rows, then columns, each gathered before it is converted to float."""
  h, w = img.shape[:2]
  if (h, w) == (size, size):
    return img.astype(np.float32)

  def taps(n):   # half-pixel centres, edges clamped
    pos = (np.arange(size) + 0.5) * n / size - 0.5
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, n - 1)
    return i0, np.minimum(i0 + 1, n - 1), np.clip(pos - i0, 0, 1).astype(np.float32)

  (y0, y1, wy), (x0, x1, wx) = taps(h), taps(w)
  top, bot = img[y0].astype(np.float32), img[y1].astype(np.float32)
  rows = top + (bot - top) * wy[:, None, None]
  left, right = rows[:, x0], rows[:, x1]
  return left + (right - left) * wx[None, :, None]


def center_crop(img: np.ndarray, size: int, crop_fraction: float = CENTER_CROP) -> np.ndarray:
  h, w = img.shape[:2]
  c = int(min(h, w) * crop_fraction)
  y, x = (h - c) // 2, (w - c) // 2
  return resize(img[y:y + c, x:x + c], size)


def decode_image(image) -> np.ndarray:
  """Encoded bytes (JPEG, PNG: what tfds hands over with `SkipDecoding`) -> uint8 HWC RGB;
  an array passes through."""
  if isinstance(image, (bytes, np.bytes_)):
    from PIL import Image   # only pipelines over encoded records need it
    with Image.open(io.BytesIO(image)) as im:
      return np.asarray(im.convert("RGB"))
  return np.asarray(image)


def to_rgb(img: np.ndarray) -> np.ndarray:
  """HW or HWC with 1 or 3 channels -> HWC with 3."""
  if img.ndim == 2:
    img = img[..., None]
  return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def normalize(img: np.ndarray, norm: str) -> np.ndarray:
  """0..255 pixel values -> the network's input: `(x / 255 - mean) / std` per channel, float32."""
  if norm not in MEAN:
    raise ValueError(f"Unknown normalisation {norm!r}: use one of {sorted(MEAN)}.")
  # One multiply-add in float32 (no float64 temporaries): x / (255 std) - mean / std.
  std = np.asarray(STD[norm], np.float32)
  scale, offset = 1 / (255 * std), -np.asarray(MEAN[norm], np.float32) / std
  return np.asarray(img, np.float32) * scale + offset


def eval_image(img: np.ndarray, image_size: int, policy: str, norm: str) -> np.ndarray:
  """One raw image (uint8, HW or HWC, or encoded bytes) -> the network's float32 input, as evaluation sees it."""
  img = to_rgb(decode_image(img))
  img = center_crop(img, image_size) if policy == "imagenet" else resize(img, image_size)
  return normalize(img, norm)


def eval_transform(cfg) -> Callable[[np.ndarray], np.ndarray]:
  """The evaluation transform of a config (`saved_config.read` of a run's work directory, or
  `load`'s second value): a batch of raw uint8 images (N, H, W, C), C = 1 or 3, -> float32
  (N, S, S, 3)."""
  data = cfg.data if "data" in cfg else cfg
  if data.event_frames:
    raise ValueError("eval_transform is for images; event frames are normalised per sample by the pipeline.")
  size, policy, norm = int(data.image_size), data.eval_policy, data.norm

  def transform(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"Images of shape {images.shape}: pass a batch (N, H, W, C) with 1 or 3 channels "
                       f"(one image: images[None]).")
    return np.stack([eval_image(im, size, policy, norm) for im in images])
  return transform
