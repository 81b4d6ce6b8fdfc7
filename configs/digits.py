"""The built-in default: scikit-learn's handwritten digits (ships with the package), 32x32,
ge2mst_tiny at T=4, K=2. Trains in a few minutes on a CPU.

python train.py --config configs/digits.py[:steps=N]
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, steps="500")
  c = common.base_config("ge2mst_tiny", dataset="digits", num_classes=10, image_size=32)
  c.data.norm = "digits"
  c.batch_size = 64
  c.eval_batch_size = 120
  c.total_steps = int(a["steps"])
  c.optimizer.lr = 8e-3          # at batch 256 (linear scaling): 2e-3 at batch 64
  c.optimizer.warmup_steps = 25
  c.log_every = 25
  c.checkpoint_every = 250
  return c
