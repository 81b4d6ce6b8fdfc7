"""CIFAR10-DVS event frames, fine-tuned from an ImageNet checkpoint through the input adapter.

Expects a tfds data set (name in data.name, default 'cifar10_dvs') whose 'image' feature is
event frames [frames, H, W, 2] (counts per polarity) and 'label' is the class; build it with
a tfds builder on a machine with TensorFlow and copy the ArrayRecord files to data.data_dir.

python train.py --config configs/cifar10_dvs.py:small,finetune=/ckpt/in1k_small
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
