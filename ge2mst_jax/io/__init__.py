"""Leaves every other subpackage may use: user paths (`paths`, local or gs://), the one-line errors
(`errors`), configs saved beside checkpoints (`saved_config`), and the entry points' helpers (`cli`,
`hugepages`).
"""
