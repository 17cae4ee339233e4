"""Triton kernels for the per-site ops (one file per op family, the PyTorch reference beside it in ops.py)."""
