"""CIFAR10-DVS event frames, fine-tuned from an ImageNet checkpoint through the input adapter.

Reads the set `python -m ge2mst_jax.prepare cifar10_dvs --manual_dir DIR --data_dir OUT` makes
(docs/data.md): 'image' is event frames [frames, H, W, 2] (counts per polarity, resized here to
image_size), splits 'train' and 'test' are the package's fixed stratified 9:1 split. `frames`
must be the prepared set's (--frames, default 10 in both).

python train.py --config configs/cifar10_dvs.py:small,finetune=/ckpt/in1k_small --config.data.data_dir=OUT
Args: size (tiny|small|base|large), finetune, frames (default 10), image_size (default 64).
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, size="small", finetune="", frames="10", image_size="64")
  size = int(a["image_size"])
  model = "ge2mst_tiny" if a["size"] == "tiny" else f"ge2mst_{a['size']}_cifar"
  c = common.base_config(model, dataset="cifar10_dvs", num_classes=10, image_size=size,
                         event_frames=int(a["frames"]), gw_strides=(2, 2))
  c.data.augment = "none"
  c.batch_size = 64
  c.epochs = 100
  c.total_steps = c.get_ref("epochs") * common.steps_per_epoch(c, 9000)   # follows --config.batch_size
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 500
  c.label_smoothing = 0.1
  c.init_from.checkpoint = a["finetune"]
  return c
