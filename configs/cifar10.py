"""CIFAR-10 at 32x32 (tfds 'cifar10', ArrayRecord in data.data_dir;
`python -m ge2mst_jax.prepare cifar10 --manual_dir DIR --data_dir OUT` makes it, docs/data.md).

python train.py --config configs/cifar10.py:small --config.data.data_dir=/data/tfds
Args: size (tiny|small|base|large, default small); 'finetune' to start from an ImageNet
checkpoint: --config configs/cifar10.py:small,finetune=/ckpt/imagenet_small
"""
from configs import common


def get_config(arg=None):
  return make_config(arg, "cifar10", 10)


def make_config(arg, dataset: str, num_classes: int):
  """The CIFAR recipe; cifar100.py uses it with its own data set."""
  a = common.parse_arg(arg, size="small", finetune="")
  model = "ge2mst_tiny" if a["size"] == "tiny" else f"ge2mst_{a['size']}_cifar"
  c = common.base_config(model, dataset=dataset, num_classes=num_classes, image_size=32)
  c.data.augment = "cifar"        # reflect-pad 4 + random crop + horizontal flip
  c.data.norm = "cifar"
  c.batch_size = 128
  c.epochs = 100 if a["finetune"] else 300
  steps_per_epoch = common.steps_per_epoch(c, 50000)        # follows --config.batch_size
  c.total_steps = c.get_ref("epochs") * steps_per_epoch
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.label_smoothing = 0.1
  c.checkpoint_every = 2000
  c.eval_every = 5000
  if a["finetune"]:
    c.init_from.checkpoint = a["finetune"]
    c.optimizer.lr = 2e-4
  return c
