"""Tensor parallelism: the rank group (group.py) and the transform that shards a model (tensor_parallel.py)."""
