"""CIFAR10-DVS recordings as numpy: the `.aedat` reader and the integration of events into frames.

The recordings (one `.aedat` file per sample, one folder or zip per class) begin with text
header lines that start with `#` (the first is `#!AER-DAT...`); then come 8-byte records, each a
big-endian uint32 address and a big-endian uint32 timestamp in microseconds. The address of a
DVS128 event holds the polarity in bit 0, the sensor's x in bits 1-7 and y in bits 8-14. As
SpikingJelly and tonic read the data set, the sensor's axes are mirrored and swapped into the
image's (column = 127 - sensor y, row = 127 - sensor x) and the polarity is inverted (1 = ON),
so that frames show the CIFAR-10 images upright.

Frames follow SpikingJelly's "split by number": the N events are cut, in time order, into
`frames` runs of N // frames events (the last run takes the remainder), and each run is counted
per pixel into two channels, channel 0 for OFF (p = 0) and channel 1 for ON (p = 1).
"""
from __future__ import annotations

import numpy as np

from ge2mst_jax.io.errors import DataError

SENSOR = 128           # the DVS128's pixels per side
MAGIC = b"#!AER-DAT"


def header_length(data: bytes) -> int:
  """Bytes of the `#` header lines at the start of `data`."""
  pos = 0
  while data.startswith(b"#", pos):
    end = data.find(b"\n", pos)
    if end < 0:
      return len(data)
    pos = end + 1
  return pos


def parse_aedat(data: bytes, name: str = "recording") -> dict[str, np.ndarray]:
  """The events of one recording's bytes: {'t', 'x', 'y', 'p'} (int64, uint8, uint8, uint8) in
  image coordinates, in file order. `name` names the file in errors."""
  if not data.startswith(MAGIC):
    raise DataError(f"{name} is not an AEDAT recording (it does not begin with {MAGIC.decode()}): "
                    f"give the CIFAR10-DVS .aedat files as distributed.")
  body = memoryview(data)[header_length(data):]
  if len(body) % 8:
    raise DataError(f"{name} is truncated ({len(body)} bytes of events, not a whole number of 8-byte "
                    f"records): download or extract it again.")
  words = np.frombuffer(body, dtype=">u4").reshape(-1, 2)
  addr, t = words[:, 0], words[:, 1]
  sensor_x, sensor_y = (addr >> 1) & 0x7F, (addr >> 8) & 0x7F
  return {"t": t.astype(np.int64), "x": (SENSOR - 1 - sensor_y).astype(np.uint8),
          "y": (SENSOR - 1 - sensor_x).astype(np.uint8), "p": (1 - (addr & 1)).astype(np.uint8)}


def split_by_number(n: int, frames: int) -> np.ndarray:
  """The frame boundaries: [frames + 1] indices, frame i is events [b[i], b[i + 1])."""
  bounds = np.arange(frames + 1) * (n // frames)
  bounds[-1] = n
  return bounds


def integrate(events: dict[str, np.ndarray], frames: int, size: int = SENSOR, name: str = "A recording") -> np.ndarray:
  """[frames, size, size, 2] uint16 event counts (channel 0 OFF, 1 ON), split by number.

  `size` divides the sensor's 128: each output pixel is the sum of a block of sensor pixels,
  so counts stay counts at any size. `name` names the recording in errors.
  """
  if SENSOR % size:
    raise DataError(f"Frame size {size} does not divide the sensor's {SENSOR} pixels: use one of 128, 64, 32, 16.")
  n = len(events["t"])
  if n < frames:
    raise DataError(f"{name} holds {n} events, too few for {frames} frames: lower --frames.")
  scale = SENSOR // size
  frame = np.repeat(np.arange(frames), np.diff(split_by_number(n, frames)))
  y, x = events["y"].astype(np.int64) // scale, events["x"].astype(np.int64) // scale
  flat = ((frame * size + y) * size + x) * 2 + events["p"]
  counts = np.bincount(flat, minlength=frames * size * size * 2)
  return np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16).reshape(frames, size, size, 2)
