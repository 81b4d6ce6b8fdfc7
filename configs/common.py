"""Defaults shared by every config; each data set's file overrides what differs."""
import ml_collections

from ge2mst_jax.nn import models


def arch_dict(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every ArchConfig field of a family member, so `--config.model.arch.FIELD=...` works for all."""
  arch = models.arch_config(name, **overrides).flat()
  # None ("automatic") fields become typed placeholders that a flag can still set.
  arch = {k: ml_collections.config_dict.placeholder(int) if v is None else v for k, v in arch.items()}
  return ml_collections.ConfigDict(arch)


def parse_arg(arg: str | None, **defaults) -> dict:
  """`"small,steps=100"` -> {'size': 'small', 'steps': '100'} over the defaults."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if value:
      out[key] = value
    else:
      out["size"] = key
  return out


def steps_per_epoch(c: ml_collections.ConfigDict, train_images: int):
  """Steps of one pass over `train_images`, as a reference to `c.batch_size`: schedules built
  from it follow the batch size, also when it is overridden on the command line."""
  return train_images // c.get_ref("batch_size")


def base_config(model: str, *, dataset: str, num_classes: int, image_size: int, **arch) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": model, "arch": arch_dict(model, image_size=image_size, **arch)})
  c.data = ml_collections.ConfigDict(dict(
      name=dataset, num_classes=num_classes, image_size=image_size, data_dir="", train_split="train",
      test_split="test", augment="none", eval_policy="none", norm="cifar", workers=0, read_threads=2,
      event_frames=0,
      # The 'imagenet' policy's extras (ge2mst_jax/data/augment.py): timm's RandAugment config string
      # ('' = none) and random erasing's probability; decode_in_workers: tfds hands the workers the
      # encoded images (SkipDecoding), which they decode themselves, at the crop's scale.
      randaugment="", random_erasing=0.0, random_erasing_mode="pixel", decode_in_workers=False))
  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, base_batch_size=256, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=100, grad_clip=1.0,
      min_lr_ratio=0.0))
  # Progressive activation: alpha ramps ClipReLU -> ExpG-IF quantizer (SPEC §1).
  c.alpha = ml_collections.ConfigDict(dict(kind="linear", ramp_end=0.8, power=1.0))
  c.label_smoothing = 0.0
  c.mixup = 0.0
  c.cutmix = 0.0
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1))
  c.init_from = ml_collections.ConfigDict(dict(checkpoint="", reset_head=True))
  c.log_every = 50
  c.eval_every = 0
  c.eval_modes = ("quantize", "spike")
  # Evaluation's float32 matmuls and convolutions at full precision: accelerators otherwise run them
  # at reduced precision by default (TF32 on GPU, bf16 passes on TPU), and the spike/quantize
  # comparison is meant in exact float32. 'default' gives the accelerator's default back.
  c.eval_matmul_precision = "highest"
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.nonfinite = "stop"          # 'stop' (raise, keep the last good checkpoint) | 'skip' (drop the step)
  # Pods (README "Running on a TPU slice / GPU cluster"):
  c.lease = ml_collections.ConfigDict(dict(timeout_secs=60.0, heartbeat_secs=10.0))  # work-directory ownership
  c.watchdog_secs = 1800.0      # exit (status 75) when no step or eval batch completes for this long; 0: off
  c.preempted_exit_code = 0     # exit status after a preemption save (e.g. 143 where the scheduler restarts only failures)
  c.compile_cache_dir = ""      # persistent XLA cache: "" = ~/.cache/ge2mst_jax/xla, "off" = none
  # A jax.profiler trace of `steps` train steps (0: off), `after` steps into the run, written to
  # WORKDIR/profile/host_N (ge2mst_jax/train/profiling.py; TensorBoard's profile plugin reads it).
  c.profile = ml_collections.ConfigDict(dict(steps=0, after=10))
  return c
