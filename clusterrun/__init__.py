"""clusterrun: launch PyTorch distributed training across machines over SSH."""

__version__ = "0.1.0"
