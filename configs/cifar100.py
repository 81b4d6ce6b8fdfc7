"""CIFAR-100 at 32x32 (tfds 'cifar100', ArrayRecord in data.data_dir;
`python -m ge2mst_jax.prepare cifar100 --manual_dir DIR --data_dir OUT` makes it, docs/data.md): the CIFAR-10 recipe.

python train.py --config configs/cifar100.py:small --config.data.data_dir=/data/tfds
Args: size (tiny|small|base|large, default small); finetune=/ckpt/imagenet_small to start from ImageNet.
"""
from configs import cifar10


def get_config(arg=None):
  return cifar10.make_config(arg, "cifar100", 100)
