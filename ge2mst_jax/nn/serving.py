"""The inference function as a serialized program (`jax.export`): what a serving stack, or a
process with another JAX and without ge2mst_jax, runs.

    exported = serving.export_inference(model, "spike", platforms=("cpu", "cuda"))
    blob = exported.serialize()
    # elsewhere, with jax alone:
    logits = jax.export.deserialize(blob).call(images)   # images [b, H, W, C] float32, normalised

The weights are constants of the program, the batch dimension is symbolic (any batch size
runs), and the program records the platforms it was lowered for: lowering for CUDA or TPU
needs no such device here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_platforms(platforms) -> tuple[str, ...]:
  """`platforms` as a tuple, CPU always included; a one-line error for an unknown name."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown:
    raise ValueError(f"Unknown export platform(s) {unknown}: choose from {PLATFORMS}.")
  return ("cpu", *(p for p in dict.fromkeys(platforms) if p != "cpu"))


def input_spec(model) -> jax.ShapeDtypeStruct:
  """The program's input: a batch of `b` (symbolic) normalised float32 images of the model's size."""
  cfg = model.cfg
  (b,) = jax.export.symbolic_shape("b")
  if cfg.event_frames:
    return jax.ShapeDtypeStruct((b, cfg.event_frames, cfg.image_size, cfg.image_size, 2), jnp.float32)
  return jax.ShapeDtypeStruct((b, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)


def export_inference(model, mode: str, platforms=("cpu",), matmul_precision: str = "highest") -> jax.export.Exported:
  """`images -> logits` (the embedding for a network without a classifier) of `model` in `mode`,
  lowered for `platforms` with its weights as constants.

  `matmul_precision` is the evaluation's (`eval_matmul_precision`): accelerators would otherwise
  run the float32 dots at reduced precision and the two modes' logits would drift apart.
  """
  if model.training:
    raise ValueError("The model is in training mode (BatchNorm on batch statistics): call model.eval() first.")
  graphdef, state = nnx.split(model)

  def infer(images):
    return nnx.merge(graphdef, state)(images, mode=mode)

  with jax.default_matmul_precision(matmul_precision):
    return jax.export.export(jax.jit(infer), platforms=check_platforms(platforms))(input_spec(model))
