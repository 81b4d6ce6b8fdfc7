"""The config a run saves in its work directory (and an export carries), read back and compared.

Also the one place every run-config key gets its default (`defaults`, which
configs/common.base_config starts from): a config saved before a key existed is read with
that key's default (`migrate`), so the code reads every key directly, with no fallbacks.
No orbax here: reading a config is all `load` of an exported file needs.
"""
from __future__ import annotations

import json

import ml_collections
from etils import epath
from flax import traverse_util

from ge2mst_jax.io import energy_table, paths
from ge2mst_jax.io.errors import CheckpointError

FILE = "config.json"


def save(cfg, workdir) -> None:
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(wd / FILE, cfg.to_json(indent=2))


# Fields a fresh config holds once, as one FieldReference at both places (configs/common.py):
# the images the data pipeline makes and the images the network is built for.
SHARED = ("image_size", "event_frames")


def defaults() -> ml_collections.ConfigDict:
  """Today's default of every run-config key but the data set's and the network's own (the
  data set's name, classes and image size, and `model`, which configs/common.base_config adds)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      data_dir="", train_split="train", test_split="test", augment="none", eval_policy="none", norm="cifar",
      workers=0, read_threads=2, event_frames=0,
      # The 'imagenet' policy's extras (ge2mst_jax/data/augment.py): timm's RandAugment config string
      # ('' = none) and random erasing's probability; decode_in_workers: tfds hands the workers the
      # encoded images (SkipDecoding), which they decode themselves, at the crop's scale.
      randaugment="", random_erasing=0.0, random_erasing_mode="pixel", decode_in_workers=False))
  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, base_batch_size=256, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=100,
      grad_clip=1.0, min_lr_ratio=0.0))
  # Progressive activation: alpha ramps ClipReLU -> ExpG-IF quantizer (docs/math.md#progressive-activation).
  c.alpha = ml_collections.ConfigDict(dict(kind="linear", ramp_end=0.8, power=1.0))
  c.label_smoothing = 0.0
  c.mixup = 0.0
  c.cutmix = 0.0
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))
  # cpu: the processes are CPU hosts (collectives over TCP), also implied by JAX_PLATFORMS=cpu.
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1, cpu=False))
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
  # Pods (docs/pods.md):
  c.lease = ml_collections.ConfigDict(dict(timeout_secs=60.0, heartbeat_secs=10.0))  # work-directory ownership
  c.watchdog_secs = 1800.0      # exit (status 75) when no step or eval batch completes for this long; 0: off
  c.preempted_exit_code = 0     # exit status after a preemption save (e.g. 143 where the scheduler restarts only failures)
  c.compile_cache_dir = ""      # persistent XLA cache: "" = ~/.cache/ge2mst_jax/xla, "off" = none
  # A jax.profiler trace of `steps` train steps (0: off), `after` steps into the run, written to
  # WORKDIR/profile/host_N (ge2mst_jax/train/profiling.py; TensorBoard's profile plugin reads it).
  c.profile = ml_collections.ConfigDict(dict(steps=0, after=10))
  # The hardware energy model's constants, each with its source (io/energy_table.py; eval.py's report).
  c.energy = energy_table.table()
  return c


def _fill(cfg: ml_collections.ConfigDict, default: ml_collections.ConfigDict) -> None:
  for key, value in default.items():
    if key not in cfg:
      cfg[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(cfg[key], ml_collections.ConfigDict):
      _fill(cfg[key], value)


def migrate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved config as today's code reads it (in place): keys added since it was saved take
  their defaults, and the `SHARED` fields become one reference again, as in a fresh config.
  Missing `model.arch` fields take ArchConfig's defaults when the network is built."""
  _fill(cfg, defaults())
  arch = cfg.model.arch
  for key in SHARED:
    value = cfg.data[key]
    if key in arch and arch[key] != value:
      raise CheckpointError(f"The saved config has data.{key}={value} but model.arch.{key}={arch[key]}; the "
                            f"network is built for the images the data gives: make them equal in its {FILE}.")
    cfg.data[key] = arch[key] = ml_collections.FieldReference(value)
  return cfg


def from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config (a work directory's config.json, an export's metadata), migrated."""
  return migrate(ml_collections.ConfigDict(json.loads(text)))


def read(workdir, required: bool = True) -> ml_collections.ConfigDict | None:
  """The config a train.py run saved in its work directory (None if absent and not `required`)."""
  path = epath.Path(workdir) / FILE
  if not path.exists():
    if not required:
      return None
    raise CheckpointError(f"{workdir} has no {FILE}: it is not a work directory written by train.py.")
  return from_json(path.read_text())


def flat(tree: dict, sep: str = "/") -> dict:
  """Nested dicts as one dict keyed by joined paths (keys may be ints: nnx list indices)."""
  return {sep.join(map(str, path)): v for path, v in traverse_util.flatten_dict(tree).items()}


def diff(saved, current) -> list[str]:
  """`key: saved -> current` for every config value that differs (JSON-normalised)."""
  a, b = (flat(json.loads(c.to_json()), ".") for c in (saved, current))
  return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]
