"""ImageNet-1k at 224x224 (tfds 'imagenet2012', ArrayRecord in data.data_dir;
`python -m ge2mst_jax.prepare imagenet2012 --manual_dir DIR --data_dir OUT` makes it, docs/data.md), the paper's sizes.

python train.py --config configs/imagenet2012.py:small --config.data.data_dir=/data/tfds --workdir=/ckpt/in1k_small

Recipe (the group's published spiking-transformer recipe, SpikingResformer): AdamW,
lr 1e-3 at batch 256 scaled linearly with the batch, weight decay 0.01, 5 warm-up epochs
then cosine decay, label smoothing 0.1, mixup 0.8 / cutmix 1.0, random-resized crops and flips,
timm's RandAugment `rand-m9-mstd0.5-inc1` and random erasing 0.25 (pixel noise), as Spikformer
and its successors train ImageNet; 300 epochs. Evaluation: resize + 87.5 % centre crop.
"""
from configs import common

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  a = common.parse_arg(arg, size="small", epochs="300", batch="256")
  c = common.base_config(f"ge2mst_{a['size']}", dataset="imagenet2012", num_classes=1000, image_size=224)
  c.data.train_split, c.data.test_split = "train", "validation"
  c.data.augment, c.data.eval_policy, c.data.norm = "imagenet", "imagenet", "imagenet"
  c.data.randaugment = "rand-m9-mstd0.5-inc1"   # timm's string: magnitude 9, std 0.5, increasing ops
  c.data.random_erasing = 0.25
  c.data.decode_in_workers = True  # JPEG bytes to the workers, decoded at each crop's scale
  c.data.workers = 16
  c.batch_size = int(a["batch"])
  c.eval_batch_size = 250          # any size: padded to a multiple of the device count and masked
  c.epochs = int(a["epochs"])
  steps_per_epoch = common.steps_per_epoch(c, TRAIN_IMAGES)   # follows --config.batch_size
  c.total_steps = c.get_ref("epochs") * steps_per_epoch
  c.optimizer.lr = 1e-3            # at batch 256; scaled by batch_size / 256
  c.optimizer.base_batch_size = 256
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.label_smoothing = 0.1
  c.mixup, c.cutmix = 0.8, 1.0
  c.mesh.fsdp = 1                  # raise on pods to shard parameters and optimizer state
  c.log_every = 100
  c.checkpoint_every = 2000
  c.eval_every = 10 * steps_per_epoch
  c.model.arch.dtype = "bfloat16"
  return c
