"""Tensor and pipeline parallelism over torch.distributed."""
