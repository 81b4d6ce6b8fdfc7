"""Prepares the paper's data sets from the files a user downloads, as the tfds ArrayRecord sets the
configs read, without TensorFlow: `python -m ge2mst_jax.prepare DATASET --manual_dir DIR --data_dir OUT`.

`writer` writes any set shard by shard (resumable, in parallel); `cifar`, `imagenet` and
`cifar10_dvs` are the data sets (the first two interchangeable with tfds' own builds); `events`
reads CIFAR10-DVS recordings and integrates them into frames.
"""
